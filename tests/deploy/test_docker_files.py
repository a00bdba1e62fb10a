"""Static checks of Dockerfile.gpu, docker-compose.yml and .env.example (there is no Docker engine here): they
parse, have what production needs, and every command they run exists in the package."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in (REPO / "Dockerfile.gpu").read_text().splitlines() if not ln.strip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines) + "\n")  # as Docker does: comments out, then continuations
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _check_command(cmd: list[str]) -> None:
    """The programs the containers run exist in this package: uvicorn app, celery app + queues, python -m modules."""
    prog = cmd[0]
    if prog == "uvicorn":
        module, attr = cmd[1].split(":")
        assert hasattr(importlib.import_module(module), attr), cmd
    elif prog == "celery":
        app_module = cmd[cmd.index("-A") + 1]
        mod = importlib.import_module(app_module)
        assert hasattr(mod, "app") or hasattr(mod, "celery"), cmd
        from jobs.queue import QUEUES

        assert "worker" in cmd
        assert set(cmd[cmd.index("-Q") + 1].split(",")) <= set(QUEUES), cmd
        assert "--pool=solo" in cmd
    elif prog in ("python", "python3"):
        if cmd[1] == "-m":
            assert importlib.util.find_spec(cmd[2]) is not None, cmd
        else:
            assert cmd[1] == "-c"
            compile(cmd[2], "<healthcheck>", "exec")
    elif prog == "redis-server":
        assert "--appendonly" in cmd and cmd[cmd.index("--appendonly") + 1] == "yes"
    elif prog == "CMD":
        _check_command(cmd[1:])
    else:
        assert prog in ("redis-cli",), f"unknown program {prog!r} in {cmd}"


def test_compose_services_volumes_and_healthchecks(compose):
    services = compose["services"]
    assert {"redis", "api", "worker"} <= set(services)
    assert {"data", "models", "redis-data"} <= set(compose["volumes"])
    for name in ("redis", "api", "worker"):
        hc = services[name]["healthcheck"]
        assert hc["test"][0] == "CMD" and hc["interval"], name
        _check_command(hc["test"])
    assert services["redis"]["command"][:3] == ["redis-server", "--appendonly", "yes"]
    assert "redis-data:/data" in services["redis"]["volumes"]


def test_api_and_worker_share_the_data_volume_and_redis(compose):
    services = compose["services"]
    for name in ("api", "worker"):
        svc = services[name]
        assert "data:/data" in svc["volumes"] and "models:/models" in svc["volumes"], name
        env = svc["environment"]
        assert env["MINIDALLE_DATA_DIR"] == "/data" and env["HF_HOME"] == "/models", name
        assert env["MINIDALLE_REDIS_URL"] == "redis://redis:6379/0", name
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
        _check_command(svc["command"])
    # inside its container the API listens on every interface; the host publishes it on loopback unless told
    assert services["api"]["ports"] == ["${MINIDALLE_BIND:-127.0.0.1}:8000:8000"]
    assert "--host" in services["api"]["command"] and "0.0.0.0" in services["api"]["command"]


def test_compose_requires_keys_with_a_bootstrap_admin_key(compose):
    for name in ("api", "worker"):
        env = compose["services"][name]["environment"]
        assert env["MINIDALLE_AUTH"] == "keys", name
        assert env["MINIDALLE_ADMIN_KEY"].startswith("${MINIDALLE_ADMIN_KEY:?"), name  # compose refuses without it
    text = (REPO / ".env.example").read_text()
    assert re.search(r"^MINIDALLE_ADMIN_KEY=", text, flags=re.M)  # the one setting .env must have


def test_worker_reserves_an_nvidia_gpu(compose):
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d.get("count", 0) >= 1 for d in devices)
    assert compose["services"]["worker"]["environment"]["MINIDALLE_DEVICE"] == "cuda"
    assert "api" not in [s for s, v in compose["services"].items() if "deploy" in v]


def test_dockerfile_cuda_runtime_nonroot_healthcheck_and_sources(dockerfile):
    instructions = [i for i, _ in dockerfile]
    base = dict(dockerfile)["FROM"]
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    user = [a for i, a in dockerfile if i == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert instructions.index("USER") > max(i for i, (w, _) in enumerate(dockerfile) if w == "RUN")
    assert "HEALTHCHECK" in instructions
    hc = dict(dockerfile)["HEALTHCHECK"]
    exec_form = hc[hc.index("CMD"):]
    _check_command(json.loads(exec_form[len("CMD"):].strip()) if "[" in exec_form else shlex.split(exec_form))
    volumes = dict(dockerfile)["VOLUME"]
    assert "/models" in volumes and "/data" in volumes
    assert "HF_HOME=/models" in dict(dockerfile)["ENV"]
    copied = set()
    for _, args in [d for d in dockerfile if d[0] == "COPY"]:
        for src in args.split()[:-1]:
            copied.add(src.rstrip("/"))
            if src != "README.md":  # written by the lead; the build needs it (pyproject's readme)
                assert (REPO / src).exists(), src
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {p.rstrip("*") for p in packages["include"]} <= copied  # `pip install .` must see every package
    assert any("pip install ." in a for i, a in dockerfile if i == "RUN")
    _check_command(json.loads(dict(dockerfile)["CMD"]))


def test_env_example_lists_every_setting():
    from jobs.settings import CommonSettings
    from service.settings import ApiSettings, ServeSettings
    from worker.settings import WorkerSettings

    text = (REPO / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s*(MINIDALLE_[A-Z0-9_]+)=", text, flags=re.M))
    expected = {f"MINIDALLE_{name.upper()}" for cls in (CommonSettings, WorkerSettings, ApiSettings, ServeSettings)
                for name in cls.model_fields}
    assert listed == expected
