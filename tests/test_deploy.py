"""The recipe people copy (``deploy/``, README "Many machines") says what the multi-host test
runs (tests/test_multihost.py runs ``deploy/postgres.sql``, ``deploy/mlflow-server.sh``,
``deploy/mlflow-user.sh`` and the variables of ``deploy/worker.env``). These tests keep the
README's section and the compose file in step with those files; the compose file itself is
checked only with ``docker compose config`` (no image is built or run here).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
# what compose refuses to start without (its `${VAR:?}`), given dummies for `config`
COMPOSE_SECRETS = ("POSTGRES_PASSWORD", "DB_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                   "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD")


def _worker_env() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (DEPLOY / "worker.env").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return dict(pairs)


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### Many machines")
    return text[start:text.index("\n## ", start)]


def _compose_tool() -> list[str] | None:
    """``docker compose`` (the plugin) or ``docker-compose`` (Debian's, `make compose`)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_the_readme_recipe_is_what_the_bench_runs():
    section = _readme_section()
    for used in ("deploy/postgres.sql", "deploy/mlflow-server.sh", "deploy/mlflow-user.sh",
                 "deploy/worker.env", "--app-name basic-auth", "scram-sha-256", ".pgpass",
                 "deploy/compose.yaml", "docker compose config"):
        assert used in section, used
    for key, value in _worker_env().items():
        assert key in section, key
        if key != "MLFLOW_TRACKING_PASSWORD":  # a placeholder in both
            assert value in section, (key, value)
    # no password in a URL anywhere in the recipe: user@host, never user:password@host
    for text in (section, *(p.read_text() for p in DEPLOY.rglob("*") if p.is_file())):
        assert not re.search(r"postgresql://[^@/\s:]+:[^@/\s]+@", text)


def test_the_postgresql_settings_agree_wherever_the_recipe_gives_them():
    """The settings the bench starts PostgreSQL with (tests/hosts.py) are those of the
    README's postgresql.conf lines and of the compose file's postgres command, no more."""
    from hosts import SERVER_SETTINGS

    want = {k: str(v) for k, v in SERVER_SETTINGS.items()}
    conf = _readme_section().split("postgresql.conf", 1)[1].split("pg_hba.conf", 1)[0]
    readme = dict(re.findall(r"(\w+) = (\d+)", conf))
    command = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["postgres"]["command"]
    compose = dict(arg.split("=", 1) for arg in command[2::2])
    assert command[0] == "postgres" and set(command[1::2]) == {"-c"}, command
    assert readme == want and compose == want, (readme, compose, want)


def test_the_compose_file_runs_the_recipe():
    """Parsed as YAML (no tool needed): its services run the recipe's scripts, and the workers
    get deploy/worker.env's variables with the services' names for dbhost."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "mlflow-user", "worker"}
    assert services["mlflow"]["command"] == ["sh", "deploy/mlflow-server.sh"]
    assert services["mlflow-user"]["command"] == ["sh", "deploy/mlflow-user.sh"]
    assert "./postgres.sql:/docker-entrypoint-initdb.d/mnist_opt.sql:ro" in services["postgres"]["volumes"]
    worker = services["worker"]
    assert worker["command"][:2] == ["mnist-opt", "study"] and worker["command"][-2:] == ["--workers", "1"]
    want = {k: v.replace("dbhost/", "postgres/").replace("//dbhost:", "//mlflow:")
            for k, v in _worker_env().items()}
    got = {k: v for k, v in worker["environment"].items() if k in want}
    want["MLFLOW_TRACKING_PASSWORD"] = got.get("MLFLOW_TRACKING_PASSWORD")  # from .env
    assert got == want
    assert worker["environment"]["PGPASSFILE"] == "/run/secrets/pgpass"
    assert any(v.endswith(":/data:ro") for v in worker["volumes"])  # the data, read-only


@pytest.mark.skipif(_compose_tool() is None,
                    reason="neither `docker compose` nor `docker-compose` here (`make compose`)")
def test_docker_compose_config_accepts_the_file(tmp_path):
    """`config` validates the file against the Compose schema and resolves its variables
    (no daemon needed); it refuses to when a secret is missing."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path),
           **{name: f"dummy-{name.lower()}" for name in COMPOSE_SECRETS},
           "MNIST_OPT_DATA": str(tmp_path)}
    cmd = [*_compose_tool(), "-f", str(DEPLOY / "compose.yaml"), "config"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]
    assert resolved["worker"]["environment"]["MLFLOW_TRACKING_PASSWORD"] == \
        "dummy-mlflow_tracking_password"
    assert resolved["worker"]["volumes"] in ([f"{tmp_path}:/data:ro"],
                                             [{"type": "bind", "source": str(tmp_path),
                                               "target": "/data", "read_only": True}])
    del env["MLFLOW_TRACKING_PASSWORD"]
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "MLFLOW_TRACKING_PASSWORD" in refused.stderr
