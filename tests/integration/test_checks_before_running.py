"""What the commands say before a job runs, as a user runs them: local inputs an embedded run's workers
would refuse, one line each, from `validate --check-inputs` and `run --dry-run`; a distributed submit's
local inputs, which workers on other hosts may not see; prompts a model may cut short."""

from __future__ import annotations

from pathlib import Path

from kits.helpers import write_image, write_job
from kits.processes import imgjobs

RESIZE = {"type": "resize", "model": "cpu"}
REFUSED = (
    "not under a folder workers may read local inputs from (IMGJOBS_LOCAL_INPUT_ROOTS): "
    "workers will refuse it"
)


def test_validate_and_a_dry_run_name_each_local_input_workers_would_refuse(tmp_path: Path) -> None:
    job, elsewhere = tmp_path / "job", tmp_path / "elsewhere"
    write_image(job / "a.png", size=(8, 8))
    outside = write_image(elsewhere / "c.png", size=(8, 8))
    (job / "link.png").symlink_to(outside)
    rows = [
        {"id": "inside", "image": "a.png"},
        {"id": "absolute", "image": str(outside)},
        {"id": "up", "image": "../elsewhere/c.png"},
        {"id": "link", "image": "link.png"},
    ]
    spec = write_job(job, rows, stage=RESIZE, output=str(tmp_path / "out"))
    items = job / "items.jsonl"
    expected = [
        f"error: {items}:2: image: {outside}: {REFUSED}",
        f"error: {items}:3: image: {outside}: {REFUSED}",
        f"error: {items}:4: image: {job / 'link.png'} (through a symbolic link, it is {outside}): {REFUSED}",
    ]
    # No folder of the operator's: an embedded run's workers read the job's own folders only.
    env = {"IMGJOBS_LOCAL_INPUT_ROOTS": ""}
    for command in (["validate", str(spec), "--check-inputs"], ["run", str(spec), "--dry-run"]):
        checked = imgjobs(*command, env=env)
        assert checked.returncode == 2, checked.stderr
        assert checked.stderr.splitlines() == expected, command
    allowed = imgjobs(
        "validate", str(spec), "--check-inputs", env={"IMGJOBS_LOCAL_INPUT_ROOTS": str(elsewhere)}
    )
    assert allowed.returncode == 0, allowed.stderr


def test_a_distributed_submit_warns_of_local_inputs_and_validate_of_long_prompts(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", size=(8, 8))
    rows = [
        {"id": "local", "image": "a.png", "prompt": " ".join(["word"] * 90)},
        {"id": "remote", "image": "s3://bucket/b.png"},
    ]
    spec = write_job(tmp_path, rows, model="sd15")
    planned = imgjobs("submit", str(spec), "--dry-run")  # no broker: plans and sends nothing
    assert planned.returncode == 0, planned.stderr
    local = next(line for line in planned.stderr.splitlines() if "read local files" in line)
    assert local.startswith("warning: 1 item(s) read local files (such as a.png): workers on other hosts may")
    checked = imgjobs("validate", str(spec))
    assert checked.returncode == 0, checked.stderr
    assert "read local files" not in checked.stderr, "an embedded run's workers share this machine's files"
    items = tmp_path / "items.jsonl"
    assert checked.stderr.splitlines()[0].startswith(
        f"warning: {items}:1: prompt: may be cut short by the model: it has at least 90 CLIP"
    )
