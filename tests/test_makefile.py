"""The Makefile on a fresh machine: a Python too old for flowbus is refused at once, saying
which one to use, not after pip has tried every version of every dependency."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

#: A stand-in for an interpreter older than 3.11: it says its version and fails anything else
#: (its pip would back-track through every release of the dependencies for minutes).
OLD_PYTHON = '#!/bin/sh\nif [ "$1" = -V ]; then echo "Python 3.10.13"; exit 0; fi\nexit 1\n'


def make_install(project: Path, python: str) -> subprocess.CompletedProcess[str]:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, project / name)
    return subprocess.run(
        ["make", "demo", f"PYTHON={python}"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def stub(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OLD_PYTHON)
    path.chmod(0o755)
    return path


def test_make_refuses_a_python_older_than_3_11_and_says_how_to_choose_another(
    tmp_path: Path,
) -> None:
    old = stub(tmp_path / "bin" / "python3.10")
    done = make_install(tmp_path, str(old))
    assert done.returncode != 0
    assert "flowbus needs Python 3.11 or later" in done.stderr, done.stderr
    assert "Python 3.10.13" in done.stderr and "PYTHON=python3.12" in done.stderr
    assert not (tmp_path / ".venv").exists()  # nothing made that a later run would reuse


def test_make_refuses_a_venv_made_earlier_with_an_old_python_and_says_to_clean_it(
    tmp_path: Path,
) -> None:
    stub(tmp_path / ".venv" / "bin" / "python")
    done = make_install(tmp_path, sys.executable)  # a good Python now, the old .venv still
    assert done.returncode != 0
    assert "Python 3.10.13" in done.stderr and "make clean" in done.stderr, done.stderr
