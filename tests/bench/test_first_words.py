"""bench.first_words: its measurement and its arguments (the figures are `make bench`'s)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.first_words import Speaker, main, measure, parser
from workers.server import LocalServer

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("kind", ["simulated", "pipecat"])
@pytest.mark.parametrize("streamed", [True, False])
async def test_each_turn_is_measured_from_respond_to_its_first_word_and_its_end(
    server: LocalServer, streamed: bool, kind: Speaker
) -> None:
    fast = ["--first-token", "0", "--words-per-second", "1000", "--chars-per-second", "1000"]
    args = parser().parse_args(["--turns", "2", *fast])
    times = await measure(server.url, args, streamed, kind)
    assert len(times) == 2
    assert all(0 < first <= end for first, end in times)


@pytest.mark.parametrize(
    "argv", [["--turns", "0"], ["--words-per-second", "0"], ["--first-token", "-1"]]
)
def test_arguments_out_of_range_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit, match="must be"):
        main(argv)


def test_help_is_the_help_alone() -> None:
    """Pipecat prints a banner when it is imported; `--help` does not import it."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.first_words", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    assert done.stdout.startswith("usage: python -m bench.first_words")
    assert done.stderr == ""
