"""Data shapes shared by the producer (jobs/) and the workers (workers/): pydantic models, the error
tree, settings and Redis key names. Nothing here does I/O or imports the rest of the project."""
