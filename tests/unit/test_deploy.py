"""The deployment files in deploy/ checked against the code they deploy, without Docker or a cluster:
every model has a compose worker, a Deployment and a KEDA scaler on the queue its worker consumes,
the commands and flags they use exist, grace periods outlast a chunk, workers run as non-root,
Redis keeps its data, and no credentials are committed."""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import runpy
import secrets
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points, packages_distributions
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from typer.testing import CliRunner

from jobs import cli
from jobs.embedded import EmbeddedRedis, free_port
from schemas.messages import JOB_END_QUEUE, priority_lists, queue_of_list
from schemas.registry import BUILTIN_MODELS, MODEL_NAME_PATTERN, ModelEntry, RegistryFile, queue_for
from schemas.schedule import parse_duration
from schemas.settings import ENV_PREFIX, Settings, celery_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
REGISTRY = DEPLOY / "models.example.yaml"
HEALTHCHECK = DOCKER / "worker-healthcheck.sh"
HEALTHCHECK_IN_IMAGE = "imgjobs-worker-healthcheck"
MAKEFILE = ROOT / "Makefile"
OPERATIONS = ROOT / "docs" / "operations.md"
GUIDE_MODELS = {"sd15", "sdxl-refiner", "kandinsky22", "sd-x4-upscaler"}

WorkerArgv = Callable[[list[str]], list[str]]


# --- loading ---------------------------------------------------------------------------------------


def yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def k8s_objects(kind: str) -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml_docs(path) if doc.get("kind") == kind]


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return loaded


def registry() -> RegistryFile:
    return RegistryFile.model_validate(yaml.safe_load(REGISTRY.read_text(encoding="utf-8")))


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DOCKER / name).read_text(encoding="utf-8").splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{name} ends inside a continued line"
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def instruction(instructions: list[tuple[str, str]], keyword: str) -> str:
    found = [args for kw, args in instructions if kw == keyword]
    assert found, f"no {keyword}"
    return found[-1]


def option_value(argv: list[str], option: str) -> str:
    assert option in argv, f"{option} not in {argv}"
    return argv[argv.index(option) + 1]


def worker_services() -> dict[str, dict[str, Any]]:
    """Compose services that run `imgjobs worker`, by model."""
    services: dict[str, dict[str, Any]] = compose()["services"]
    workers = {}
    for service in services.values():
        if str(service.get("build", {}).get("dockerfile", "")).endswith("worker.Dockerfile"):
            workers[option_value(service["command"], "--model")] = service
    return workers


def deployments() -> dict[str, dict[str, Any]]:
    """Kubernetes worker Deployments, by model."""
    found = {}
    for deployment in k8s_objects("Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        found[option_value(container["args"], "--model")] = deployment
    return found


def chunk_time_limit(env: dict[str, str] | None = None) -> int:
    """The longest a chunk may run: the deployment's IMGJOBS_TASK_TIME_LIMIT_S, else the default."""
    value = (env or {}).get(f"{ENV_PREFIX}TASK_TIME_LIMIT_S")
    if value is not None:
        return int(value)
    default = Settings.model_fields["task_time_limit_s"].default
    assert isinstance(default, int)
    return default


def compose_duration_s(value: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a compose duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


COMPOSE_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def compose_interpolate(text: str, env: Mapping[str, str]) -> str:
    """`text` as compose fills it in from `env`: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}
    and ${VAR?error}, with variables inside defaults, and `$$` for a `$`. A required variable that is
    missing fails the test."""

    def parse(i: int, in_braces: bool) -> tuple[str, int]:
        out: list[str] = []
        while i < len(text):
            if in_braces and text[i] == "}":
                return "".join(out), i
            if text.startswith("$$", i):
                out.append("$")
                i += 2
            elif text.startswith("${", i):
                name = COMPOSE_VARIABLE.match(text, i + 2)
                assert name, f"not a compose variable at {text[i:]!r}"
                i = name.end()
                operator = next((op for op in (":-", ":?", "-", "?") if text.startswith(op, i)), "")
                i += len(operator)
                argument, i = parse(i, True) if operator else ("", i)
                assert text[i : i + 1] == "}", f"unclosed ${{ in {text!r}"
                i += 1
                value = env.get(name.group())
                unset = value is None or (operator.startswith(":") and value == "")
                assert not (unset and operator.endswith("?")), f"{name.group()} is required: {argument}"
                out.append(argument if unset else value or "")
            else:
                out.append(text[i])
                i += 1
        assert not in_braces, f"unclosed ${{ in {text!r}"
        return "".join(out), i

    return parse(0, False)[0]


def env_example_values() -> dict[str, str]:
    """deploy/env.example as an operator fills it in: each REPLACE_ME becomes a fresh secret."""
    values = {}
    for line in (DEPLOY / "env.example").read_text(encoding="utf-8").splitlines():
        name, equals, value = line.partition("=")
        if equals and not line.startswith("#"):
            values[name] = secrets.token_hex(12) if value == "REPLACE_ME" else value
    return values


def clean_environ() -> dict[str, str]:
    """This process's environment without any broker or Flower settings of its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("IMGJOBS_", "CELERY_", "FLOWER_"))}


# --- the files parse and the registry is valid -------------------------------------------------------


def test_every_yaml_file_under_deploy_parses_into_mappings() -> None:
    paths = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert {p.name for p in paths} >= {"docker-compose.yml", "models.example.yaml", "workers.yaml"}
    for path in paths:
        docs = yaml_docs(path)
        assert docs and all(isinstance(doc, dict) for doc in docs), path


def test_dockerfiles_parse_and_copy_only_what_exists() -> None:
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "VOLUME", "USER", "WORKDIR", "HEALTHCHECK"}
    known |= {"ENTRYPOINT", "CMD"}
    for name in ("worker.Dockerfile", "producer.Dockerfile"):
        instructions = dockerfile(name)
        assert {kw for kw, _ in instructions} <= known, name
        for keyword, args in instructions:
            if keyword == "COPY" and "--from=" not in args:
                sources = [word for word in args.split() if not word.startswith("--")][:-1]
                for source in sources:  # the build context is the repository root
                    assert (ROOT / source).exists(), f"{name}: COPY {source}: no such path"


def test_example_registry_validates_and_pins_the_builtin_checkpoints() -> None:
    parsed = registry()
    assert set(parsed.models) == GUIDE_MODELS
    for name, entry in parsed.models.items():
        assert entry.source == BUILTIN_MODELS[name].source, name
        assert MODEL_NAME_PATTERN.match(name), name


def test_the_configmap_carries_the_example_registry() -> None:
    (configmap,) = [cm for cm in k8s_objects("ConfigMap") if cm["metadata"]["name"] == "imgjobs-models"]
    example = yaml.safe_load(REGISTRY.read_text(encoding="utf-8"))
    assert yaml.safe_load(configmap["data"]["models.yaml"]) == example


# --- one worker, one Deployment and one scaler per model, all on the same queue ----------------------


def worker_queues(model: str) -> list[str]:
    """What `imgjobs worker --model MODEL` consumes: the cpu workers also write jobs' ends."""
    return [queue_for(model), JOB_END_QUEUE] if model == "cpu" else [queue_for(model)]


def test_every_model_has_a_compose_worker_a_deployment_and_a_scaler() -> None:
    models = set(registry().models) | {"cpu"}  # the built-in cpu model: resize stages and jobs' ends
    assert set(worker_services()) == models
    assert set(deployments()) == models
    targets = {so["spec"]["scaleTargetRef"]["name"] for so in k8s_objects("ScaledObject")}
    assert targets == {d["metadata"]["name"] for d in deployments().values()}


def test_keda_watches_the_queue_each_deployment_consumes() -> None:
    by_name = {d["metadata"]["name"]: model for model, d in deployments().items()}
    for scaled in k8s_objects("ScaledObject"):
        model = by_name[scaled["spec"]["scaleTargetRef"]["name"]]
        triggers = scaled["spec"]["triggers"]
        # Every priority's list of every queue the worker consumes, not only the lists named after them.
        expected = [name for queue in worker_queues(model) for name in priority_lists(queue)]
        assert [trigger["metadata"]["listName"] for trigger in triggers] == expected, model
        # KEDA scales to the largest of several triggers; the formula makes it scale on their sum.
        modifiers = scaled["spec"]["advanced"]["scalingModifiers"]
        terms = [term.strip() for term in modifiers["formula"].split("+")]
        assert sorted(terms) == sorted(trigger["name"] for trigger in triggers), model
        assert all(re.fullmatch(r"[a-z_]+", term) for term in terms), modifiers["formula"]
        assert modifiers["metricType"] == "AverageValue" and float(modifiers["target"]) > 0, model
        assert modifiers["activationTarget"] == "0", model  # any waiting chunk starts a worker
        assert scaled["spec"]["minReplicaCount"] == 0
        for trigger in triggers:
            assert trigger["type"] == "redis"
            assert trigger["authenticationRef"]["name"] in {
                ta["metadata"]["name"] for ta in k8s_objects("TriggerAuthentication")
            }


@pytest.fixture
def worker_argv(monkeypatch: pytest.MonkeyPatch) -> WorkerArgv:
    """Runs the real `imgjobs worker` command with the given arguments and returns the Celery argv it
    would exec, without a broker: only the connection check and the exec are replaced."""
    monkeypatch.setenv(f"{ENV_PREFIX}BROKER_URL", "redis://:placeholder@127.0.0.1:6379/0")
    monkeypatch.delenv(f"{ENV_PREFIX}MODELS", raising=False)
    monkeypatch.setattr(cli, "connect_redis", lambda url: None)
    execs: list[list[str]] = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: execs.append(list(argv)))

    def run(args: list[str]) -> list[str]:
        result = CliRunner().invoke(cli.app, ["worker", *args, "--models", str(REGISTRY)])
        assert result.exit_code == 0, result.output
        return execs.pop()

    return run


def test_the_worker_command_consumes_the_queue_keda_watches(worker_argv: WorkerArgv) -> None:
    list_names = {
        so["spec"]["scaleTargetRef"]["name"]: [
            trigger["metadata"]["listName"] for trigger in so["spec"]["triggers"]
        ]
        for so in k8s_objects("ScaledObject")
    }
    for deployment in deployments().values():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        argv = worker_argv(container["args"])  # exactly what the pod passes to `imgjobs worker`
        watched = list(dict.fromkeys(map(queue_of_list, list_names[deployment["metadata"]["name"]])))
        assert option_value(argv, "--queues").split(",") == watched
        assert option_value(argv, "--concurrency") == "1"
    for model, service in worker_services().items():
        assert option_value(worker_argv(service["command"]), "--queues").split(",") == worker_queues(model)


def test_image_entrypoints_and_probe_commands_exist() -> None:
    with (ROOT / "pyproject.toml").open("rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    worker = json.loads(instruction(dockerfile("worker.Dockerfile"), "ENTRYPOINT"))
    producer = json.loads(instruction(dockerfile("producer.Dockerfile"), "ENTRYPOINT"))
    assert worker == ["imgjobs", "worker"] and producer == ["imgjobs"]
    assert "imgjobs" in scripts
    commands = typer.main.get_command(cli.app).commands  # type: ignore[attr-defined]
    assert {"worker", "submit", "status"} <= set(commands)
    assert "--model" in {opt for param in commands["worker"].params for opt in param.opts}

    # The health check is installed under the name the Dockerfile's HEALTHCHECK and the probes run.
    worker_file = dockerfile("worker.Dockerfile")
    copies = [args for kw, args in worker_file if kw == "COPY"]
    assert any(f"deploy/docker/{HEALTHCHECK.name} /usr/local/bin/{HEALTHCHECK_IN_IMAGE}" in c for c in copies)
    assert json.loads(instruction(worker_file, "HEALTHCHECK").partition("CMD")[2]) == [HEALTHCHECK_IN_IMAGE]
    assert os.access(HEALTHCHECK, os.X_OK)
    for deployment in deployments().values():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["exec"]["command"] == [HEALTHCHECK_IN_IMAGE]


def test_the_celery_commands_used_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery import Celery
    from celery.bin.celery import celery as celery_cli

    assert list(entry_points(group="console_scripts", name="celery"))
    # The health check's `celery inspect ping` flags.
    inspect_options = {opt for param in celery_cli.commands["inspect"].params for opt in param.opts}
    script = HEALTHCHECK.read_text(encoding="utf-8")
    call = script[script.index("celery inspect ping") :]
    assert set(re.findall(r"--[a-z-]+", call)) <= inspect_options
    assert hasattr(Celery().control.inspect(), "ping")
    # Flower and the health check configure Celery's default app through CELERY_BROKER_URL alone.
    services = compose()["services"]
    assert services["flower"]["entrypoint"] == ["celery"] and services["flower"]["command"][0] == "flower"
    assert "CELERY_BROKER_URL" in services["flower"]["environment"]
    runs = [args for kw, args in dockerfile("producer.Dockerfile") if kw == "RUN"]
    assert any("pip install" in run and '"flower>=' in run for run in runs)
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://:placeholder@example.invalid:6379/0")
    assert Celery().conf.broker_url == "redis://:placeholder@example.invalid:6379/0"


def celery_on_the_worker_app(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "celery", "-A", "workers.app", *args]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_celery_inspect_on_the_worker_app_takes_celerys_broker_variable(redis_server: Any) -> None:
    done = celery_on_the_worker_app(
        clean_environ() | {"CELERY_BROKER_URL": redis_server.url}, "inspect", "ping", "--timeout", "1"
    )
    assert "Traceback" not in done.stderr, done.stderr
    # It reached the broker and asked; no worker runs here to answer.
    assert "No nodes replied" in done.stdout + done.stderr, done.stdout + done.stderr


def test_the_worker_app_without_a_broker_says_so_in_one_line() -> None:
    done = celery_on_the_worker_app(clean_environ(), "inspect", "ping", "--timeout", "1")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "IMGJOBS_BROKER_URL" in errors[0] and "CELERY_BROKER_URL" in errors[0]


# --- Flower ------------------------------------------------------------------------------------------


def get(url: str, login: tuple[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if login:
        token = base64.b64encode(":".join(login).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_flower_as_compose_runs_it_serves_its_api_to_the_login_of_the_env_file(tmp_path: Path) -> None:
    service = compose()["services"]["flower"]
    values = env_example_values()
    login = (values.get("FLOWER_USER", "admin"), values.get("FLOWER_PASSWORD", ""))
    command = [*service["entrypoint"], *service["command"]]
    assert command[0] == "celery" and "--port=5555" in command
    assert "127.0.0.1:5555:5555" in service["ports"]
    port = free_port()
    argv = [arg if not arg.startswith("--port=") else f"--port={port}" for arg in command[1:]]
    with EmbeddedRedis(tmp_path / "redis", password=values["REDIS_PASSWORD"]) as server:
        # Flower on this host: the broker through env.example's override for services elsewhere.
        values["IMGJOBS_BROKER_URL"] = server.url
        env = clean_environ() | {
            k: compose_interpolate(str(v), values) for k, v in service["environment"].items()
        }
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", *argv, "--address=127.0.0.1"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if get(f"{base}/healthcheck") == (200, b"OK"):
                        break
                except OSError:
                    pass
                assert flower.poll() is None, flower.stderr.read().decode() if flower.stderr else ""
                assert time.monotonic() < deadline, "flower did not answer"
                time.sleep(0.3)
            assert get(f"{base}/api/workers")[0] == 401
            assert get(f"{base}/api/workers", (login[0], "wrong"))[0] == 401
            status, body = get(f"{base}/api/workers", login)
            assert status == 200, body
            assert json.loads(body) == {}  # no worker runs here
        finally:
            flower.terminate()
            flower.wait(10)
    # The password comes from the env file, never from the compose file, and nothing opens the API
    # without one.
    assert "${FLOWER_PASSWORD:?" in service["environment"]["FLOWER_BASIC_AUTH"]
    assert "FLOWER_UNAUTHENTICATED_API" not in service["environment"]


def test_task_events_are_left_to_flower_and_documented() -> None:
    # Off in the workers' configuration (Celery's default) ...
    config = celery_config(Settings(), "redis://h/0")
    assert not config.get("worker_send_task_events") and not config.get("task_send_sent_event")
    # ... and Flower, as compose runs it, keeps turning them on.
    flower = compose()["services"]["flower"]
    assert not any("enable_events" in str(arg) for arg in flower["command"])
    assert not any("ENABLE_EVENTS" in name for name in flower["environment"])
    doc = OPERATIONS.read_text(encoding="utf-8")
    assert "`worker_send_task_events`" in doc and "`enable_events`" in doc


# --- the health check --------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_the_health_check_pings_the_node_that_imgjobs_worker_names(
    worker_argv: WorkerArgv, tmp_path: Path
) -> None:
    argv = worker_argv(["--model", "sd15"])
    # A stand-in process with the worker's command line, and a `celery` that records its call.
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *argv[1:]])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "celery-call.json"
    fake = bin_dir / "celery"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'broker': os.environ.get('CELERY_BROKER_URL')}}, "
        f"open({str(record)!r}, 'w'))\n",
        encoding="utf-8",
    )
    fake.chmod(0o755)
    broker = "redis://:placeholder@redis:6379/0"
    try:
        env = os.environ | {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "IMGJOBS_WORKER_PID": str(stand_in.pid),
            "IMGJOBS_BROKER_URL": broker,
        }
        for _ in range(50):  # until the stand-in has exec'd into its final command line
            if "--hostname" in Path(f"/proc/{stand_in.pid}/cmdline").read_text(errors="replace"):
                break
            time.sleep(0.05)
        done = subprocess.run(["sh", str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30)
    finally:
        stand_in.send_signal(signal.SIGTERM)
        stand_in.wait(10)
    assert done.returncode == 0, done.stderr
    call = json.loads(record.read_text(encoding="utf-8"))
    node = option_value(argv, "--hostname").replace("%h", socket.gethostname())
    assert call["argv"] == ["inspect", "ping", "--destination", node, "--timeout", "10"]
    assert node.startswith(queue_for("sd15") + ".")
    assert call["broker"] == broker and broker not in " ".join(call["argv"])


def test_the_health_check_fails_for_a_process_that_is_not_a_worker() -> None:
    env = os.environ | {"IMGJOBS_WORKER_PID": str(os.getpid()), "IMGJOBS_BROKER_URL": "redis://x:6379/0"}
    done = subprocess.run(["sh", str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "not a Celery worker" in done.stderr


@pytest.mark.slow
def test_the_health_check_gets_a_pong_from_a_real_worker(
    redis_server: Any, workers: Any, registry: Any
) -> None:
    worker = workers.start("tiny-sd", redis_server.url, registry)
    workers.wait_ready()
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "IMGJOBS_WORKER_PID": str(worker.process.pid),
        "IMGJOBS_BROKER_URL": redis_server.url,
    }
    done = subprocess.run(["sh", str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr + workers.logs()
    assert "pong" in done.stdout


# --- resources, grace periods, users, Redis ----------------------------------------------------------


def test_each_model_worker_gets_exactly_one_gpu_and_the_cpu_worker_none() -> None:
    cpu_service, cpu_deployment = worker_services()["cpu"], deployments()["cpu"]
    assert "deploy" not in cpu_service
    (cpu_container,) = cpu_deployment["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in cpu_container["resources"]["requests"]
    for model, service in worker_services().items():
        if model == "cpu":
            continue
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], model
        assert device.get("count") == 1 or len(device.get("device_ids", [])) == 1, model
    for model, deployment in deployments().items():
        if model == "cpu":
            continue
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        resources = container["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == 1 == resources["limits"]["nvidia.com/gpu"], model


def test_grace_periods_outlast_the_longest_chunk() -> None:
    for model, service in worker_services().items():
        env = {k: str(v) for k, v in service.get("environment", {}).items()}
        assert compose_duration_s(service["stop_grace_period"]) > chunk_time_limit(env), model
    for model, deployment in deployments().items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        assert pod["terminationGracePeriodSeconds"] > chunk_time_limit(env), model
        # maxSurge 0: a rollout must not wait for a spare GPU.
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
        # KEDA owns the replica count; a fixed one would be reset on every apply.
        assert "replicas" not in deployment["spec"], model


def test_workers_and_producer_run_as_non_root() -> None:
    for name in ("worker.Dockerfile", "producer.Dockerfile"):
        user = instruction(final_stage(dockerfile(name)), "USER")
        uid = user.partition(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{name}: USER {user}"  # numeric: runAsNonRoot checks it
    for service in compose()["services"].values():
        assert str(service.get("user", "")).partition(":")[0] not in {"0", "root"}
    for model, deployment in deployments().items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, model
        assert pod["securityContext"].get("runAsUser", 1) != 0, model
        (container,) = pod["containers"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, model


def test_redis_keeps_its_data_and_never_evicts() -> None:
    redis = compose()["services"]["redis"]
    command = [str(arg) for arg in redis["command"]]
    assert option_value(command, "--appendonly") == "yes"
    assert option_value(command, "--maxmemory-policy") == "noeviction"
    assert "--maxmemory" in command and "--requirepass" in command
    assert any(str(volume).endswith(":/data") for volume in redis["volumes"])


def test_workers_get_their_settings_and_the_registry() -> None:
    for model, service in worker_services().items():
        env = service["environment"]
        assert env["IMGJOBS_BROKER_URL"].startswith("${IMGJOBS_BROKER_URL:-redis://"), model
        assert env["IMGJOBS_MODELS"] == "/etc/imgjobs/models.yaml"
        assert "http://minio:9000" in env["AWS_ENDPOINT_URL"] and service["env_file"] == ".env"
        assert f"./{REGISTRY.name}:/etc/imgjobs/models.yaml:ro" in service["volumes"]
    secret_keys = set(k8s_objects("Secret")[0]["stringData"])
    for model, deployment in deployments().items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["IMGJOBS_BROKER_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@$(REDIS_ADDRESS)/0"
        assert env["IMGJOBS_MODELS"]["value"] == "/etc/imgjobs/models.yaml"
        names = list(env)  # $(VAR) only expands variables defined earlier in the list
        assert names.index("REDIS_PASSWORD") < names.index("IMGJOBS_BROKER_URL"), model
        assert names.index("REDIS_ADDRESS") < names.index("IMGJOBS_BROKER_URL"), model
        refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e]
        assert {ref["key"] for ref in refs} <= secret_keys, model
        assert {f"AWS_{k}" for k in ("ENDPOINT_URL", "ACCESS_KEY_ID", "SECRET_ACCESS_KEY")} <= set(env)
    (auth,) = k8s_objects("TriggerAuthentication")
    assert {ref["key"] for ref in auth["spec"]["secretTargetRef"]} <= secret_keys
    assert {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]} == {"address", "password"}


def test_k8s_manifests_are_namespace_agnostic_and_the_secret_is_not_applied() -> None:
    for path in K8S.glob("*.yaml"):
        for doc in yaml_docs(path):
            assert "namespace" not in doc.get("metadata", {}), path
    (kustomization,) = yaml_docs(K8S / "kustomization.yaml")
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_compose_variables_that_must_be_set_are_in_env_example() -> None:
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE.read_text(encoding="utf-8")))
    example = (DEPLOY / "env.example").read_text(encoding="utf-8")
    assert required and all(re.search(rf"^{name}=", example, re.M) for name in required), required


# --- no credentials committed ------------------------------------------------------------------------

PLACEHOLDERS = re.compile(r"^(REPLACE_ME|placeholder|\.\.\.|\*\*\*|<[a-z-]+>|\$\([A-Z_]+\)|\$\{[^}]*\})$")
SECRET_NAMES = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", re.I)


def committed_text_files() -> list[Path]:
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and p.name != ".env"]  # .env is the local copy
    return [*files, OPERATIONS]


def test_no_real_looking_credentials_are_committed() -> None:
    for path in committed_text_files():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b", text), f"{path}: an AWS access key id"
        assert "PRIVATE KEY-----" not in text, f"{path}: a private key"
        for password in re.findall(r"://[^\s/:@]*:(\$\{[^}]*\}|[^\s@/]+)@", text):
            assert PLACEHOLDERS.match(password), f"{path}: a password in a URL: {password!r}"
    for line in (DEPLOY / "env.example").read_text(encoding="utf-8").splitlines():
        name, _, value = line.partition("=")
        if line and not line.startswith("#") and SECRET_NAMES.search(name):
            assert PLACEHOLDERS.match(value), line
    (secret,) = k8s_objects("Secret")
    assert "data" not in secret  # base64 would hide what is committed
    for key, value in secret["stringData"].items():
        if SECRET_NAMES.search(key):
            assert PLACEHOLDERS.match(value), key
    minio = compose()["services"]["minio"]["environment"]
    assert all(str(v).startswith("${") for v in minio.values())


# --- the producer image and the docs follow the code -------------------------------------------------


def third_party_imports(*packages: str) -> set[str]:
    names: set[str] = set()
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            # Imports only for type checking (`if TYPE_CHECKING:`) are not needed at run time.
            typing_only = {
                id(child)
                for node in ast.walk(tree)
                if isinstance(node, ast.If)
                and isinstance(node.test, ast.Name)
                and node.test.id == "TYPE_CHECKING"
                for child in ast.walk(node)
            }
            for node in ast.walk(tree):
                if id(node) in typing_only:
                    continue
                if isinstance(node, ast.Import):
                    names |= {alias.name.partition(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.partition(".")[0])
    return {
        n
        for n in names
        if n not in sys.stdlib_module_names and n not in {"jobs", "jobstate", "schemas", "__future__"}
    }


def test_the_producer_image_installs_every_library_the_producer_imports() -> None:
    script = runpy.run_path(str(DOCKER / "producer_requirements.py"))
    requirements = script["producer_requirements"](ROOT / "pyproject.toml")
    installed = {script["requirement_name"](r) for r in requirements}
    imported = third_party_imports("jobs", "jobstate", "schemas")
    assert "workers" not in imported and "torch" not in imported  # the image has neither
    distributions = packages_distributions()
    for module in imported:
        names = {script["requirement_name"](d) for d in distributions.get(module, [module])}
        assert names & installed, f"the producer imports {module} but its image does not install it"
    copied = [args.split()[0] for kw, args in dockerfile("producer.Dockerfile") if kw == "COPY"]
    assert "workers" not in copied and {"jobs", "jobstate", "schemas"} <= set(copied)


def test_operations_doc_covers_every_setting_and_registry_field() -> None:
    doc = OPERATIONS.read_text(encoding="utf-8")
    for field in Settings.model_fields:
        assert f"`{ENV_PREFIX}{field.upper()}`" in doc, field
    for field in ModelEntry.model_fields:
        assert f"`{field}`" in doc, field
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_HOME"):
        assert f"`{name}`" in doc, name
    assert "3600" in doc and "terminationGracePeriodSeconds: 3900" in doc


# --- retention ----------------------------------------------------------------------------------------


def test_kubernetes_prunes_finished_jobs_daily_with_a_real_command() -> None:
    (cronjob,) = k8s_objects("CronJob")
    assert len(cronjob["spec"]["schedule"].split()) == 5
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].startswith("imgjobs-producer:")  # the image whose ENTRYPOINT is imgjobs
    args = container["args"]
    # The CLI's own parser takes the arguments, and the age is a duration prune accepts.
    command = typer.main.get_command(cli.app).commands[args[0]]  # type: ignore[attr-defined]
    command.make_context(args[0], list(args[1:]))
    assert parse_duration(option_value(args, "--older-than")) >= 86400
    env = {e["name"]: e for e in container["env"]}
    assert env["IMGJOBS_BROKER_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@$(REDIS_ADDRESS)/0"
    names = list(env)
    assert names.index("REDIS_PASSWORD") < names.index("IMGJOBS_BROKER_URL")
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["restartPolicy"] == "OnFailure"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"


def test_compose_runs_the_prune_from_beat_and_the_scheduler_lists_what_workers_read() -> None:
    services = compose()["services"]
    assert services["beat"]["command"] == ["schedule", "beat"]
    assert services["scheduler"]["command"] == ["schedule", "worker"]
    schedules = yaml.safe_load((DEPLOY / "schedules.example.yaml").read_text(encoding="utf-8"))
    assert parse_duration(schedules["keep_finished_jobs_for"]) > 0
    work_dirs = {v for v in worker_services()["sd15"]["volumes"] if str(v).endswith(":/work:ro")}
    assert work_dirs and work_dirs <= set(services["scheduler"]["volumes"])
    # The producer lists s3:// sources for `submit --from`: it needs the same S3 settings as workers.
    producer = services["producer"]
    assert (
        producer["env_file"] == ".env" and "http://minio:9000" in producer["environment"]["AWS_ENDPOINT_URL"]
    )


def test_the_worker_image_keeps_compiled_code_on_the_model_volume() -> None:
    stage = final_stage(dockerfile("worker.Dockerfile"))
    env = " ".join(args for kw, args in stage if kw == "ENV")
    cache = re.search(r"IMGJOBS_COMPILE_CACHE_DIR=(\S+)", env)
    assert cache is not None
    volume = (
        json.loads(instruction(stage, "VOLUME"))
        if instruction(stage, "VOLUME").startswith("[")
        else [instruction(stage, "VOLUME")]
    )
    assert any(cache.group(1).startswith(path.rstrip("/") + "/") for path in volume), (cache.group(1), volume)


def test_workers_keep_models_from_s3_on_the_model_volume() -> None:
    """IMGJOBS_MODEL_CACHE lies on a volume that outlives the worker process: a named volume in
    compose, the pod's model-cache volume in Kubernetes; and the image, compose and the Deployments
    agree on where."""
    setting = f"{ENV_PREFIX}MODEL_CACHE"
    assert "model_cache" in Settings.model_fields
    stage = final_stage(dockerfile("worker.Dockerfile"))
    image = re.search(rf"{setting}=(\S+)", " ".join(args for kw, args in stage if kw == "ENV"))
    assert image is not None, f"the worker image sets no {setting}"
    cache = image.group(1)
    named_volumes = set(compose().get("volumes") or {})
    for model, service in worker_services().items():
        assert service["environment"][setting] == cache, model
        mounts = [str(volume).split(":") for volume in service["volumes"]]
        under = [(source, target) for source, target, *_ in mounts if (cache + "/").startswith(target + "/")]
        assert under, f"{model}: {cache} is on no volume"
        source, _target = max(under, key=lambda mount: len(mount[1]))  # the innermost mount holds it
        assert source in named_volumes, f"{model}: {cache} is on {source}, not a named volume"
    for model, deployment in deployments().items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env[setting] == cache, model
        holding = [m for m in container["volumeMounts"] if (cache + "/").startswith(m["mountPath"] + "/")]
        assert holding, f"{model}: {cache} is on no volume"
        mount = max(holding, key=lambda m: len(m["mountPath"]))
        assert not mount.get("readOnly"), model
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        # Not the container's own filesystem: a volume of the pod keeps the downloads across restarts.
        assert "emptyDir" in volume or "persistentVolumeClaim" in volume, (model, volume)


def test_the_worker_image_pins_the_cuda_build_of_the_torch_release_ci_tests() -> None:
    instructions = dockerfile("worker.Dockerfile")
    args = dict(arg.partition("=")[::2] for kw, arg in instructions if kw == "ARG")
    spec = args["TORCH_SPEC"]
    # One release, not whatever is newest on the day of the build.
    pinned = re.fullmatch(r"torch==(\d+\.\d+\.\d+)", spec)
    assert pinned, f"TORCH_SPEC={spec!r} is not a pinned release"
    makefile = re.search(r"^TORCH_SPEC \?= (\S+)$", MAKEFILE.read_text(encoding="utf-8"), re.M)
    assert makefile and makefile.group(1) == spec, "the image runs another torch than CI tests"
    with (ROOT / "pyproject.toml").open("rb") as f:
        torch_requirement = next(
            d for d in tomllib.load(f)["project"]["dependencies"] if re.match(r"torch\b", d)
        )
    assert Version(pinned.group(1)) in SpecifierSet(torch_requirement.removeprefix("torch"))
    # The wheel's CUDA is the base image's: the container toolkit then checks the driver it needs.
    index = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)(\d)", args["TORCH_INDEX_URL"])
    assert index, f"TORCH_INDEX_URL={args['TORCH_INDEX_URL']!r} is not a CUDA wheel index"
    base = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-[a-z-]*runtime-ubuntu[\d.]+", args["BASE_IMAGE"])
    assert base, f"BASE_IMAGE={args['BASE_IMAGE']!r} is not a CUDA runtime image"
    assert index.groups() == base.groups(), (args["TORCH_INDEX_URL"], args["BASE_IMAGE"])
    installs = [arg for kw, arg in instructions if kw == "RUN" and '"$TORCH_SPEC"' in arg]
    assert len(installs) == 1 and '--index-url "$TORCH_INDEX_URL"' in installs[0]
