"""The README's example runs as written: a worker process of greeter.py and the bot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from bus import Settings
from tests.support import ROOT, WorkerProcesses, settings_env

FILE_BLOCK = re.compile(r"<!-- file: (?P<name>\S+) -->\n```python\n(?P<code>.*?)```", re.S)


def readme_files() -> dict[str, str]:
    return {m["name"]: m["code"] for m in FILE_BLOCK.finditer((ROOT / "README.md").read_text())}


def test_the_readme_example_greets_the_caller(
    tmp_path: Path, settings: Settings, workers: WorkerProcesses
) -> None:
    files = readme_files()
    assert set(files) == {"greeter.py", "bot.py"}
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    env = {**os.environ, **settings_env(settings)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "workers", "worker", "greeter:service"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    workers.procs.append(worker)
    bot = subprocess.run(
        [sys.executable, "bot.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert bot.returncode == 0, bot.stderr.decode()
    assert bot.stdout.decode() == "Hello Ada (event 1 of call-42)\n"


def test_the_readme_names_the_session_key_of_its_example() -> None:
    from bus import Keys

    assert f"XRANGE '{Keys().session('call-42')}' - +" in (ROOT / "README.md").read_text()
