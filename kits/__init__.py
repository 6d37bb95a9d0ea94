"""What tests and benchmarks both use to run the product for real: worker processes and a pool of them
(processes.py), job files and small builders (helpers.py), worker metrics (metrics.py), the fault
scenarios and the S3 fault proxy (faults.py, faultproxy.py), reports built from results
(reports.py), the benchmarks' folder flags and result tables (benches.py), and the GPU benchmarks'
real-shape models with random weights (real_models.py).

It is neither the product nor tests/. No product module imports it and it is not packaged, since
nothing here is for operators. Benchmarks may import it, which they may not do of tests/: a test
module is pytest's to collect, with fixtures and a conftest that only a pytest session sets up,
while a benchmark is a script run on its own. It reads what the product says of itself (the
job-state owner, the workers' answers, their metrics), never a worker's log lines.
"""
