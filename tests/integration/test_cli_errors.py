"""Entry points fail in one clear line, never a traceback, and invalid jobs enqueue nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

from jobs.embedded import EmbeddedRedis, free_port
from jobs.registry import Registry
from kits.helpers import write_image, write_job
from kits.processes import ROOT, Workers, imgjobs


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_validate_reports_every_problem_and_exits_2(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [
        {"id": "a", "image": "a.png"},
        {"id": "a", "image": "b.png"},
        {"id": "c", "image": "c.png", "seed": -1},
    ]
    for name in ("a.png", "b.png", "c.png"):
        write_image(tmp_path / name, size=(8, 8))
    spec = write_job(tmp_path, rows, model="sd15")
    checked = imgjobs("validate", str(spec))
    assert checked.returncode == 2
    lines = checked.stderr.splitlines()
    assert lines == [
        f"error: {tmp_path / 'items.jsonl'}:2: id: duplicate id 'a', first on line 1",
        f"error: {tmp_path / 'items.jsonl'}:3: seed: Input should be greater than or equal to 0",
    ]


def test_validate_ok(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", size=(8, 8))
    spec = write_job(tmp_path, [{"id": "a", "image": "a.png"}], model="sd15")
    checked = imgjobs("validate", str(spec))
    assert checked.returncode == 0 and checked.stdout.startswith("ok: 1 item(s), job id test-job-"), (
        checked.stderr
    )


def test_invalid_job_enqueues_nothing(tmp_path: Path) -> None:
    spec = write_job(tmp_path, [{"id": "a", "image": "a.png", "strength": 2}], model="sd15")
    with EmbeddedRedis(tmp_path / "redis") as server:
        submitted = imgjobs("submit", str(spec), env={"IMGJOBS_BROKER_URL": server.url})
        assert submitted.returncode == 2 and "strength" in submitted.stderr
        assert redis.Redis.from_url(server.url).dbsize() == 0


def test_missing_and_unreachable_broker(tmp_path: Path) -> None:
    spec = write_job(tmp_path, [{"id": "a", "image": "a.png"}], model="sd15")
    missing = imgjobs("submit", str(spec), env={"IMGJOBS_BROKER_URL": ""})
    assert "no broker configured" in one_error_line(missing.stderr) and missing.returncode == 2
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    unreachable = imgjobs("status", "some-job", env={"IMGJOBS_BROKER_URL": url})
    line = one_error_line(unreachable.stderr)
    assert "cannot reach the broker at redis://:***@127.0.0.1" in line and "hunter2" not in line
    assert unreachable.returncode == 2
    with EmbeddedRedis(tmp_path / "redis", password="hunter2") as server:
        where = f"Redis at 127.0.0.1:{server.port}"
        bare = imgjobs("status", "some-job", env={"IMGJOBS_BROKER_URL": f"redis://127.0.0.1:{server.port}/0"})
        assert one_error_line(bare.stderr).startswith(f"error: {where} asks for a password")
        wrong = f"redis://:guessed@127.0.0.1:{server.port}/0"
        refused = imgjobs("status", "some-job", env={"IMGJOBS_BROKER_URL": wrong})
        line = one_error_line(refused.stderr)
        assert line.startswith(f"error: {where} refused the user or password") and "guessed" not in line
        assert bare.returncode == refused.returncode == 2


def test_unknown_model_and_unknown_job(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis") as server:
        env = {"IMGJOBS_BROKER_URL": server.url}
        worker = imgjobs("worker", "--model", "no-such-model", env=env)
        assert "unknown model 'no-such-model'" in one_error_line(worker.stderr) and worker.returncode == 2
        status = imgjobs("status", "nope", "--json", env=env)
        assert "no job 'nope'" in one_error_line(status.stderr)


def test_no_job_id_names_a_path(tmp_path: Path, private_state_dir: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "redis").mkdir(parents=True)  # as an embedded job's folder holds
    (private_state_dir / "jobs").mkdir(parents=True)
    climbing = os.path.relpath(outside, private_state_dir / "jobs")
    for command, job_id in [("status", climbing), ("retry", climbing), ("cancel", "../")]:
        refused = imgjobs(command, job_id)
        assert f"{job_id!r} is not a job id" in one_error_line(refused.stderr), (command, refused.stderr)
        assert refused.returncode == 2
    assert [path.name for path in outside.rglob("*")] == ["redis"], "nothing was started or written there"


def test_status_of_a_job_whose_run_still_validates_it_says_so(
    tmp_path: Path, private_state_dir: Path
) -> None:
    write_image(tmp_path / "in" / "a.png", size=(8, 8))
    rows = [{"id": f"i{n}", "image": "in/a.png"} for n in range(50_000)]  # seconds of validation
    spec = write_job(tmp_path, rows, name="big", stage={"type": "resize", "model": "cpu"})
    run = subprocess.Popen(
        [sys.executable, "-m", "jobs", "run", str(spec)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not list((private_state_dir / "validating").glob("*.json")):
            assert run.poll() is None and time.monotonic() < deadline, "no run validating"
            time.sleep(0.02)
        run.send_signal(signal.SIGSTOP)  # held in its validation, which knows the job's id only at its end
        status = imgjobs("status", "big-0123456789ab")
        assert status.returncode == 2
        line = one_error_line(status.stderr)
        assert f"`imgjobs run {spec}` (pid {run.pid}) is validating a job of its name" in line, line
    finally:
        run.send_signal(signal.SIGCONT)
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=60)
    assert (run.returncode, stderr) == (128 + signal.SIGTERM, "interrupted\n")
    assert not list((private_state_dir / "validating").glob("*.json"))


def test_bad_env_var_is_named(tmp_path: Path) -> None:
    spec = write_job(tmp_path, [{"id": "a", "image": "a.png"}], model="sd15")
    checked = imgjobs("validate", str(spec), env={"IMGJOBS_CHUNK_SIZE": "lots"})
    assert "IMGJOBS_CHUNK_SIZE" in one_error_line(checked.stderr) and checked.returncode == 2


def test_models_lists_builtins_and_file_entries(models_yaml: Path) -> None:
    listed = imgjobs("models", "--models", str(models_yaml), "--json")
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert {
        "sd15",
        "sdxl-refiner",
        "kandinsky22",
        "sd-x2-latent-upscaler",
        "sd-x4-upscaler",
        "tiny-sd",
    } <= set(entries)
    assert entries["sd15"]["source"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert entries["tiny-sd"]["source"] == str(models_yaml.parent / "tiny-sd")
    assert (entries["cpu"]["from"], entries["tiny-sd"]["from"]) == ("built in", str(models_yaml.resolve()))
    table = imgjobs("models", "--models", str(models_yaml))
    assert table.returncode == 0 and "tiny-sd" in table.stdout and "built in" in table.stdout
    folder = str(models_yaml.parent / "tiny-sd")  # a diffusers folder named directly, as a stage may
    named = json.loads(imgjobs("models", "cpu", folder, "--json").stdout)
    assert {name: entry["from"] for name, entry in named.items()} == {
        "cpu": "built in",
        folder: "a folder named directly",
    }


def test_worker_whose_model_cannot_load_stops(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionImg2ImgPipeline"}))
    with EmbeddedRedis(tmp_path / "redis") as server:
        worker = imgjobs(
            "worker", "--model", str(broken), env={"IMGJOBS_BROKER_URL": server.url}, timeout=120
        )
    # Once: the pool process that replaces the failed one must not load the model again.
    assert worker.stderr.count("cannot load the model; stopping the worker") == 1, worker.stderr
    assert worker.returncode != 0, "a supervisor must see that the worker failed"


def test_malformed_inputs_are_one_error_line(tmp_path: Path) -> None:
    bad_param = imgjobs(
        "submit",
        "--from",
        str(tmp_path / "*.png"),
        "--model",
        "sd15",
        "--output",
        "o",
        "--param",
        "steps=[1",
        env={"IMGJOBS_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"},
    )
    assert "--param 'steps=[1': not a valid value" in one_error_line(bad_param.stderr)
    assert bad_param.returncode == 2

    latin1 = tmp_path / "models.yaml"
    latin1.write_bytes("models: {caf\xe9: {source: x}}\n".encode("latin-1"))
    registry = imgjobs("models", env={"IMGJOBS_MODELS": str(latin1)})
    assert "is not UTF-8 text" in one_error_line(registry.stderr) and registry.returncode == 2
    schedules = imgjobs("schedule", "list", env={"IMGJOBS_SCHEDULES": str(latin1)})
    assert "is not UTF-8 text" in one_error_line(schedules.stderr) and schedules.returncode == 2

    deep = tmp_path / "deep"
    spec = write_job(deep, [{"id": "a", "image": "a.png"}], model="sd15")
    write_image(deep / "a.png", size=(8, 8))
    with (deep / "items.jsonl").open("a") as items:
        items.write("[" * 100_000 + "]" * 100_000 + "\n")
    nested = imgjobs("validate", str(spec))
    assert nested.returncode == 2 and "Traceback" not in nested.stderr, nested.stderr
    assert nested.stderr.splitlines() == [
        f"error: {deep / 'items.jsonl'}:2: not valid JSON: nested too deeply"
    ]
    spec.write_text("a: " + "[" * 100_000)
    nested_spec = imgjobs("validate", str(spec))
    assert "nested too deeply" in one_error_line(nested_spec.stderr) and nested_spec.returncode == 2

    schedules_file = tmp_path / "schedules.yaml"
    schedules_file.write_text("schedules: []\n")
    env = {"IMGJOBS_BROKER_URL": "http://127.0.0.1:1/0", "IMGJOBS_SCHEDULES": str(schedules_file)}
    listed = imgjobs("schedule", "list", env=env)
    assert "must be redis:// or rediss://" in one_error_line(listed.stderr) and listed.returncode == 2

    forever = imgjobs("prune", "--older-than", "99999999999999d", env={"IMGJOBS_BROKER_URL": "redis://h/0"})
    assert "longer than a century" in one_error_line(forever.stderr) and forever.returncode == 2


def test_an_s3_listing_that_fails_is_one_error_line(tmp_path: Path) -> None:
    env = {
        "IMGJOBS_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "AWS_ACCESS_KEY_ID": "placeholder",
        "AWS_SECRET_ACCESS_KEY": "placeholder",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
    }
    listed = imgjobs("submit", "--from", "s3://bucket/in/*.png", "--model", "sd15", "--output", "o", env=env)
    assert "cannot list s3://bucket/in/*.png" in one_error_line(listed.stderr), listed.stderr
    assert listed.returncode == 2


def test_watching_a_job_no_worker_takes_says_so_then_exits_as_run_does(
    tmp_path: Path, workers: Workers
) -> None:
    image = write_image(tmp_path / "a.png", size=(24, 24))
    (tmp_path / "b.png").write_text("not an image")
    rows = [{"id": "a", "image": str(image)}, {"id": "b", "image": str(tmp_path / "b.png")}]
    spec = write_job(tmp_path, rows, stage={"type": "resize", "model": "cpu"}, defaults={"size": [16, 16]})
    with EmbeddedRedis(tmp_path / "redis") as server:
        env = {"IMGJOBS_BROKER_URL": server.url}
        submitted = imgjobs("submit", str(spec), env=env)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.split()[-1]
        watch = subprocess.Popen(
            [sys.executable, "-m", "jobs", "status", job_id, "--watch"],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=os.environ | env,
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(watch.stderr or []), daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 30
            while not any("waiting: no worker is consuming imgjobs.cpu" in line for line in lines):
                assert watch.poll() is None and time.monotonic() < deadline, "".join(lines)
                time.sleep(0.2)
            workers.start("cpu", server.url, Registry.load(None))
            assert watch.wait(timeout=120) == 1, "".join(lines)  # b failed, as `run` exits
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait()


def test_watching_a_job_whose_broker_goes_away_says_so_in_one_line(tmp_path: Path) -> None:
    spec = write_job(tmp_path, [{"id": "a", "image": "a.png"}], stage={"type": "resize", "model": "cpu"})
    with EmbeddedRedis(tmp_path / "redis") as server:
        env = {"IMGJOBS_BROKER_URL": server.url}
        submitted = imgjobs("submit", str(spec), env=env)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        watch = subprocess.Popen(
            [sys.executable, "-m", "jobs", "status", job_id, "--watch", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ | env,
        )
        assert watch.stdout is not None
        assert json.loads(watch.stdout.readline())["state"] == "pending"  # it polls: no worker takes it
        assert server.process is not None
        server.process.kill()
        _, stderr = watch.communicate(timeout=60)
    assert watch.returncode == 1, stderr
    line = one_error_line(stderr)
    assert line.startswith(f"error: lost the broker at {server.url}: "), line
    assert line.endswith(f"; `imgjobs status {job_id} --watch` follows it again"), line


def test_validate_finds_missing_inputs_folders_and_an_output_that_cannot_be_written(tmp_path: Path) -> None:
    write_image(tmp_path / "there.png", size=(8, 8))
    (tmp_path / "afolder").mkdir()
    (tmp_path / "afile").write_text("a file where the output folder should be")
    rows = [
        {"id": "ok", "image": "there.png"},
        {"id": "gone", "image": "missing.png"},
        {"id": "dir", "image": "afolder"},
    ]
    spec = write_job(
        tmp_path, rows, stage={"type": "resize", "model": "cpu"}, output=str(tmp_path / "afile" / "out")
    )
    checked = imgjobs("validate", str(spec))
    assert checked.returncode == 2
    items = tmp_path / "items.jsonl"
    assert checked.stderr.splitlines() == [
        f"error: {spec}:4: output: cannot be written: {tmp_path / 'afile'} is a file, not a folder",
        f"error: {items}:2: image: no such file: {tmp_path / 'missing.png'}",
        f"error: {items}:3: image: {tmp_path / 'afolder'} is a folder, not an image",
    ]


def test_validate_check_inputs_decodes_local_inputs_as_workers_do(tmp_path: Path) -> None:
    write_image(tmp_path / "there.png", size=(8, 8))
    (tmp_path / "notes.png").write_text("a text file with an image's name")
    write_image(tmp_path / "huge.png", size=(120, 120))
    rows = [
        {"id": "ok", "image": "there.png"},
        {"id": "text", "image": "notes.png"},
        {"id": "bomb", "image": "huge.png"},
        {"id": "gone", "image": "missing.png"},
    ]
    spec = write_job(tmp_path, rows, stage={"type": "resize", "model": "cpu"}, output=str(tmp_path / "out"))
    assert imgjobs("validate", str(spec)).returncode == 2, "a missing input is found without decoding"
    checked = imgjobs("validate", str(spec), "--check-inputs", env={"IMGJOBS_MAX_IMAGE_PIXELS": "10000"})
    assert checked.returncode == 2
    items = tmp_path / "items.jsonl"
    text, bomb, gone = checked.stderr.splitlines()
    assert text == (
        f"error: {items}:2: image: {tmp_path / 'notes.png'}: not a recognized image (PNG, JPEG, WEBP, BMP, "
        "TIFF or GIF)"
    )
    assert bomb.startswith(f"error: {items}:3: image: {tmp_path / 'huge.png'}: ") and "14400 pixels" in bomb
    assert gone == f"error: {items}:4: image: no such file: {tmp_path / 'missing.png'}"
    (tmp_path / "missing.png").unlink(missing_ok=True)
    good = write_job(tmp_path / "good", [{"id": "ok", "image": "../there.png"}], stage={"type": "resize"})
    assert imgjobs("validate", str(good), "--check-inputs").returncode == 0


def test_a_run_whose_model_passes_the_checks_but_cannot_load_stops_in_one_error_line(
    tmp_path: Path, tiny_sd_dir: Path
) -> None:
    broken = tmp_path / "models" / "broken-sd"
    shutil.copytree(tiny_sd_dir, broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.write_bytes(b"not safetensors at all")  # present, so validation takes the folder
    models = tmp_path / "models" / "models.yaml"
    models.write_text("models:\n  broken-sd:\n    source: broken-sd\n    dtype: float32\n")
    write_image(tmp_path / "in" / "a.png")
    spec = write_job(tmp_path, [{"id": "a", "image": "in/a.png"}], model="broken-sd")
    started = time.monotonic()
    ran = imgjobs("run", str(spec), "--models", str(models), timeout=240)
    assert ran.returncode == 2, ran.stderr
    errors = [line for line in ran.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: model broken-sd cannot load: "), ran.stderr
    assert "Traceback" not in ran.stderr and "worker logs: " in errors[0]
    assert time.monotonic() - started < 120, "the run stops once the worker has failed, not at a timeout"
