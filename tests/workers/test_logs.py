"""The processes' logging: quiet loggers keep their warnings only."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import ROOT

SCRIPT = """
import structlog
from workers import logs
logs.configure("info", "json", quiet=["noisy"])
structlog.get_logger("noisy").info("hidden")
structlog.get_logger("noisy").warning("shown")
structlog.get_logger("other").info("kept")
structlog.get_logger().info("unnamed")
"""


def test_a_quiet_logger_logs_its_warnings_only_and_the_others_everything() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert [json.loads(line)["event"] for line in done.stderr.splitlines()] == [
        "shown",
        "kept",
        "unnamed",
    ]
