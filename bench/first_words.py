"""``python -m bench.first_words``: how soon the caller hears a reply, streamed or whole.

A bot's `FlowManager` on a private server answers the same turns with the reply spoken whole
(the TTS given it once the LLM wrote all of it) and streamed (its first sentence spoken while
the LLM writes the rest), each with two TTSs: a `SimulatedTTS`, and a Pipecat 1.14 pipeline
(`PipelineSpeech` after a TTS service and an output transport that speak silence at the pace
of speech, `flows.pipecat_offline`), where the first word counts once the transport starts
playing it. The LLM is a `ScriptedLLM` that takes `--first-token` seconds before its first
word and then writes `--words-per-second`; the TTSs speak `--chars-per-second`. Reported: from
`respond` to the first word spoken, and to the end of the reply, p50 and max over `--turns`
turns each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio
from loguru import logger

from bus import Bus, Settings
from flows import TTS, FlowManager, LLMResponse, ScriptedLLM, SimulatedTTS
from workers import logs
from workers.runtime import run
from workers.server import LocalServer

from .workload import add_server_option

REPLY = (
    "Sure, I can help with that. Your two pizzas left our kitchen ten minutes ago and the "
    "driver should reach you in about fifteen minutes."
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.first_words", description=__doc__)
    p.add_argument("--turns", type=int, default=5, help="turns per row (default 5)")
    p.add_argument(
        "--first-token", type=float, default=0.4, help="seconds to the LLM's first word (0.4)"
    )
    p.add_argument(
        "--words-per-second", type=float, default=50.0, help="the LLM's writing speed (50)"
    )
    p.add_argument(
        "--chars-per-second", type=float, default=15.0, help="the TTS's speaking speed (15)"
    )
    add_server_option(p)
    return p


class Whole:
    """`llm`'s reply whole: once all of its stream was written, as an LLM asked for a
    complete reply gives it."""

    def __init__(self, llm: ScriptedLLM) -> None:
        self.llm = llm

    async def generate(self, messages: Any, tools: Any) -> LLMResponse:
        text = [part.text async for part in self.llm.stream(messages, tools)]
        return LLMResponse(text="".join(text))


Speaker = Literal["simulated", "pipecat"]


@asynccontextmanager
async def speaker(
    kind: Speaker, args: argparse.Namespace, heard: list[float]
) -> AsyncIterator[TTS]:
    """The TTS, which notes when it starts speaking in `heard` (if it is empty)."""

    async def speaking(event: str, text: str) -> None:
        if event == "tts.started" and not heard:
            heard.append(time.perf_counter())

    if kind == "simulated":
        yield SimulatedTTS(1 / args.chars_per_second, observer=speaking)
        return
    from .pipecat_speaker import pipeline_speech  # (Pipecat's banner, after `main` quiets it)

    seconds_per_word = len(REPLY) / len(REPLY.split()) / args.chars_per_second
    async with pipeline_speech(seconds_per_word, heard) as speech:
        yield speech


async def measure(
    url: str, args: argparse.Namespace, streamed: bool, kind: Speaker = "simulated"
) -> list[tuple[float, float]]:
    """(seconds to the first word, seconds to the end) of each turn."""
    first_word: list[float] = []

    async def thinking(event: str, node: str) -> None:
        await anyio.sleep(args.first_token)

    llm = ScriptedLLM(
        {"a": [LLMResponse(text=REPLY)]},
        observer=thinking,
        seconds_per_word=1 / args.words_per_second,
    )
    node: dict[str, Any] = {"name": "a", "task_messages": [], "respond_immediately": False}
    times = []
    settings = Settings(url=url, prefix="firstwords")
    async with Bus.connect(settings) as bus, speaker(kind, args, first_word) as tts:
        for turn in range(args.turns):
            mode = "streamed" if streamed else "whole"
            session = f"{kind}-{mode}-{turn}"
            if sys.stderr.isatty():  # (a turn lasts as long as its speech: some seconds)
                doing = f"  {kind}, {mode}: turn {turn + 1} of {args.turns}"
                print(doing, end="\r", file=sys.stderr, flush=True)
            asked = llm if streamed else Whole(llm)
            async with FlowManager.open(bus, session, llm=asked, tts=tts) as flow:
                await flow.initialize(node)
                first_word.clear()
                began = time.perf_counter()
                await flow.respond("Where is my order?")
                ended = time.perf_counter()
                await flow.end()
            if not first_word:
                sys.exit(f"{session}: nothing was heard (a TTS too fast to make a sound?)")
            times.append((first_word[0] - began, ended - began))
    return times


async def report(url: str, args: argparse.Namespace) -> None:
    print(
        f"LLM: first word after {args.first_token} s, {args.words_per_second:g} words/s; "
        f"TTS: {args.chars_per_second:g} chars/s; a reply of {len(REPLY.split())} words, "
        f"{args.turns} turns each"
    )
    print(f"{'TTS':<10} {'reply':<10} {'first word p50':>15} {'max':>7} {'end p50':>9} {'max':>7}")
    kinds: tuple[Speaker, ...] = ("simulated", "pipecat")
    for kind in kinds:
        for streamed in (False, True):
            times = await measure(url, args, streamed, kind)
            first, end = [t[0] for t in times], [t[1] for t in times]
            print(
                f"{kind:<10} {'streamed' if streamed else 'whole':<10} "
                f"{statistics.median(first):>13.3f} s {max(first):>5.3f} s "
                f"{statistics.median(end):>7.3f} s {max(end):>5.3f} s"
            )


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.turns < 1:
        sys.exit("--turns must be at least 1")
    if min(args.words_per_second, args.chars_per_second) <= 0 or args.first_token < 0:
        sys.exit("the speeds must be above 0, the first token's seconds 0 or more")
    logs.configure("warning")
    logger.remove()  # (Pipecat's own debug lines)
    with LocalServer(args.server) as server:
        run(report, server.url, args)


if __name__ == "__main__":
    main()
