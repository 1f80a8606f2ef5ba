"""Streamed replies: an LLM that writes its reply in parts and a TTS that speaks them as they
come, so the caller hears the first sentence while the LLM still writes the rest."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bus import Bus
from flows import FlowManager, FunctionCall, LLMResponse, ScriptedLLM, SimulatedTTS, Spoken
from flows.speech import sentences
from tests.flows.test_actions import node

pytestmark = pytest.mark.anyio


class Writer:
    """Writes "Sure. So, " at once (the first sentence complete: the next word has begun, as
    Pipecat waits for), then the rest of its reply once `go` is set (or raises `failure`
    instead); the rests in turn, the last one repeating."""

    def __init__(self, *rests: LLMResponse, failure: Exception | None = None) -> None:
        self.rests, self.failure = list(rests), failure
        self.go = anyio.Event()
        self.generated = 0

    def _rest(self) -> LLMResponse:
        return self.rests.pop(0) if len(self.rests) > 1 else self.rests[0]

    async def generate(self, messages: Any, tools: Any) -> LLMResponse:
        self.generated += 1
        rest = self._rest()
        return LLMResponse("Sure. So, " + rest.text, rest.function_calls)

    async def stream(self, messages: Any, tools: Any) -> AsyncIterator[LLMResponse]:
        yield LLMResponse(text="Sure. So, ")
        await self.go.wait()
        if self.failure is not None:
            raise self.failure
        yield self._rest()


class Observed(SimulatedTTS):
    """A SimulatedTTS whose `finished` is set once it finished speaking a sentence."""

    def __init__(self) -> None:
        super().__init__(0.0, observer=self._observe)
        self.finished = anyio.Event()

    async def _observe(self, kind: str, text: str) -> None:
        if kind == "tts.finished":
            self.finished.set()


def fields(entries: list[Any], kind: str) -> list[dict[str, Any]]:
    return [msgspec.json.decode(e.data) for e in entries if e.type == kind]


@asynccontextmanager
async def sure_heard(bus: Bus) -> AsyncIterator[tuple[FlowManager, Writer, Observed]]:
    """A flow answering "Book a table", from the moment "Sure." was spoken while the LLM
    still writes "So, Friday works."; the block ends once the `respond` returned."""
    llm, tts = Writer(LLMResponse(text="Friday works.")), Observed()
    async with FlowManager.open(bus, "call-1", llm=llm, tts=tts) as fm:
        await fm.initialize(node("a", respond_immediately=False))
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(fm.respond, "Book a table")
                await tts.finished.wait()
                yield fm, llm, tts


async def test_the_first_sentence_is_spoken_while_the_llm_still_writes(bus: Bus) -> None:
    async with sure_heard(bus) as (fm, llm, tts):
        assert tts.spoken == ["Sure."]
        assert "llm.completed" not in [e.type for e in await bus.history("call-1")]
        llm.go.set()
    history = await bus.history("call-1")
    assert [e.type for e in history][-2:] == ["llm.completed", "tts.finished"]
    assert fields(history, "llm.completed")[0]["text"] == "Sure. So, Friday works."
    assert fields(history, "tts.finished")[0]["heard"] == "Sure. So, Friday works."
    assert tts.spoken == ["Sure.", "So, Friday works."]
    assert fm.messages[-1] == {"role": "assistant", "content": "Sure. So, Friday works."}
    assert llm.generated == 0


async def test_an_interrupt_while_the_llm_writes_keeps_what_was_heard_and_publishes_nothing(
    bus: Bus,
) -> None:
    async with sure_heard(bus) as (fm, _, _):
        fm.interrupt()  # the respond returns; the speech ends with what was written
    kinds = [e.type for e in await bus.history("call-1")]
    assert "llm.completed" not in kinds and "tts.finished" not in kinds
    assert fm.messages[-2:] == [
        {"role": "user", "content": "Book a table"},
        {"role": "assistant", "content": "Sure. So,"},
    ]


@pytest.mark.parametrize("streamed", [True, False])
async def test_a_replys_function_calls_run_while_it_is_spoken_its_node_entered_after(
    bus: Bus, streamed: bool
) -> None:
    """As Pipecat runs them once the reply is complete: here the speech cannot go on until the
    call ran. The transition still waits for the speech (`tts.finished` before the next
    `node.entered`), and the context has the reply before the call."""
    booked = anyio.Event()

    async def book(args: dict[str, Any]) -> Any:
        booked.set()
        return {"booked": args["day"]}, node("done", respond_immediately=False)

    async def waits_for_the_call(kind: str, text: str) -> None:
        if kind == "tts.started":
            await booked.wait()

    call = FunctionCall("book", {"day": "Friday"}, id="c1")
    llm = Writer(LLMResponse(text="Booking now.", function_calls=[call]))
    llm.go.set()
    tts = SimulatedTTS(0.001, observer=waits_for_the_call)
    if not streamed:
        tts.speak_stream = None  # type: ignore[assignment,method-assign]  # whole replies
    functions = [{"name": "book", "handler": book}]
    async with FlowManager.open(bus, "call-1", llm=llm, tts=tts) as fm:
        await fm.initialize(node("a", functions=functions, respond_immediately=False))
        with anyio.fail_after(10):
            await fm.respond("Book Friday")
    kinds = [e.type for e in await bus.history("call-1")]
    assert kinds[-3:] == ["llm.completed", "tts.finished", "node.entered"]
    assert fm.current_node == "done"
    said = [m["content"] for m in fm.messages if m["role"] == "assistant" and "content" in m]
    assert said == ["Sure. So, Booking now."]
    roles = [m["role"] for m in fm.messages if m["role"] not in ("system", "developer")]
    assert roles == ["user", "assistant", "assistant", "tool"]


async def test_speech_cut_short_while_the_llm_writes_leaves_the_reply_to_be_published(
    bus: Bus,
) -> None:
    """The TTS reports the interruption (as `PipelineSpeech` does from the pipeline's) before
    the LLM is done: the reply is still complete, and published as such, as a reply cut while
    it was spoken whole is."""
    llm = Writer(LLMResponse(text="Friday works."))

    async def cut_the_first(kind: str, text: str) -> None:
        if kind == "tts.started":
            tts.interrupt()

    class CutShort(SimulatedTTS):
        async def speak_stream(self, texts: AsyncIterable[str]) -> Spoken:
            spoken = await super().speak_stream(texts)
            llm.go.set()  # the LLM writes on once the speech ended
            return spoken

    tts = CutShort(0.001, observer=cut_the_first)
    async with FlowManager.open(bus, "call-1", llm=llm, tts=tts) as fm:
        await fm.initialize(node("a", respond_immediately=False))
        with anyio.fail_after(10):
            await fm.respond("Book a table")
    history = await bus.history("call-1")
    assert fields(history, "llm.completed")[0]["text"] == "Sure. So, Friday works."
    finished = fields(history, "tts.finished")[0]
    assert (finished["interrupted"], finished["heard"]) == (True, "")
    assert fm.messages[-1] == {"role": "user", "content": "Book a table"}


async def test_an_error_of_the_llm_while_it_writes_reaches_respond_once_that_was_spoken(
    bus: Bus,
) -> None:
    """As Pipecat ends an LLM response that failed: what was written is spoken to its end
    and kept in the context; the error reaches `respond` as itself; nothing is published."""
    llm = Writer(LLMResponse(), failure=RuntimeError("the model is overloaded"))
    llm.go.set()
    tts = SimulatedTTS(0.001)
    async with FlowManager.open(bus, "call-1", llm=llm, tts=tts) as fm:
        await fm.initialize(node("a", respond_immediately=False))
        with anyio.fail_after(10), pytest.raises(RuntimeError, match="overloaded"):
            await fm.respond("Hello")
    assert tts.spoken == ["Sure.", "So,"]
    assert fm.messages[-1] == {"role": "assistant", "content": "Sure. So,"}
    kinds = [e.type for e in await bus.history("call-1")]
    assert "llm.completed" not in kinds and "tts.finished" not in kinds


async def test_a_tts_that_cannot_speak_a_stream_gets_the_whole_reply(bus: Bus) -> None:
    said: list[str] = []

    class Whole:
        async def speak(self, text: str) -> Spoken:
            said.append(text)
            return Spoken(text)

    llm = Writer(LLMResponse(text="Friday works."))
    async with FlowManager.open(bus, "call-1", llm=llm, tts=Whole()) as fm:
        await fm.initialize(node("a", respond_immediately=False))
        with anyio.fail_after(10):
            await fm.respond("Book a table")
    assert said == ["Sure. So, Friday works."] and llm.generated == 1


async def test_simulated_speech_of_a_stream_stops_where_it_was_interrupted() -> None:
    async def cut_the_second(kind: str, text: str) -> None:
        if (kind, text) == ("tts.started", "Second one."):
            tts.interrupt()  # the caller speaks up as it begins

    tts = SimulatedTTS(0.001, observer=cut_the_second)
    with anyio.fail_after(10):
        spoken = await tts.speak_stream(pieces("Hello ", "there. Second ", "one. Not heard."))
    assert spoken == Spoken("Hello there.", interrupted=True)
    assert tts.spoken == ["Hello there."]


async def pieces(*texts: str) -> AsyncIterable[str]:
    for text in texts:
        yield text


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["Hel", "lo there. How ", "are you?", "  Fine"], ["Hello there.", "How are you?", "Fine"]),
        (["It costs 3.5 euros. ", "Yes!"], ["It costs 3.5 euros.", "Yes!"]),
        (["", "  ", "Wait", "…  ", "Ok"], ["Wait…", "Ok"]),
        (["Hmm... let ", "me check. ", "Yes"], ["Hmm... let me check.", "Yes"]),
        (["At 7 p.m. ", "on Friday. ", "Bye"], ["At 7 p.m. on Friday.", "Bye"]),
        (["Plan A. ", "The", "resa ", "said so."], ["Plan A. Theresa said so."]),
        (["Plan A. ", "The", " rest."], ["Plan A.", "The rest."]),
        (['He said "Go." ', "Then he left."], ['He said "Go."', "Then he left."]),
        (["Really? no", "! Yes"], ["Really?", "no!", "Yes"]),
        (["Neither do I. Sorry."], ["Neither do I.", "Sorry."]),
        ([], []),
        (
            ["Ask Dr. ", "Smith, e.g. ", "today. J. R. R. Tolkien wrote it. ", "Mrs. Dalloway"],
            ["Ask Dr. Smith, e.g. today.", "J. R. R. Tolkien wrote it.", "Mrs. Dalloway"],
        ),
    ],
)
async def test_sentences_come_as_each_is_complete(texts: list[str], expected: list[str]) -> None:
    assert [s async for s in sentences(pieces(*texts))] == expected


@pytest.mark.parametrize("mark", [".", "!", "?", "…"])
async def test_a_sentence_is_complete_once_the_next_word_has_begun(mark: str) -> None:
    """As Pipecat's aggregator: the space after an end mark does not end the sentence yet (the
    next word may be in lower case, "p.m. on"); the next word's first letter does."""
    log: list[str] = []

    async def written() -> AsyncIterator[str]:
        for piece in (f"Hello{mark} ", "W", "ho?"):
            log.append(f"wrote {piece!r}")
            yield piece

    async for sentence in sentences(written()):
        log.append(f"spoke {sentence!r}")  # noqa: PERF401 (between the writes, in order)
    assert log == [
        f"wrote 'Hello{mark} '",
        "wrote 'W'",
        f"spoke 'Hello{mark}'",
        "wrote 'ho?'",
        "spoke 'Who?'",
    ]


#: Pieces of replies, with the places where a sentence may or may not end.
WORDS = ["Plan", "A.", "Then", "Theresa", "the", "Dr.", "Smith", "p.m.", "on", "Hmm...", "Wait…"]
WORDS += ["Yes!", "no?", '"Go."', "\u201cHi.\u201d", "(ok.)", "I.", "e.g.", "3.5", " ", "\n", "."]
WORDS += ["No.", "Jan.", "12", "5."]


@given(
    st.lists(st.sampled_from(WORDS), max_size=14).map(" ".join),
    st.lists(st.integers(0, 200), max_size=8),
)
def test_a_text_streamed_in_any_pieces_has_the_sentences_it_has_whole(
    text: str, cuts: list[int]
) -> None:
    """A piece may end anywhere: in a word ("The" of "Theresa"), between an end mark and its
    space, in the spaces after it. No place where a sentence does not end looks like one while
    the text is cut."""
    at = sorted({cut % (len(text) + 1) for cut in cuts})
    cut = [text[start:end] for start, end in zip([0, *at], [*at, len(text)], strict=True)]

    async def spoken(*texts: str) -> list[str]:
        return [s async for s in sentences(pieces(*texts))]

    whole = anyio.run(spoken, text)
    assert anyio.run(spoken, *cut) == whole
    assert anyio.run(spoken, *text) == whole  # a character at a time


def pipecats(text: str) -> list[str]:
    """`text`'s sentences as Pipecat's TTS aggregation cuts them (`match_endofsentence`)."""
    from pipecat.utils.string import match_endofsentence

    cut, rest = [], text
    while 0 < (end := match_endofsentence(rest)) < len(rest.rstrip()):
        cut.append(rest[:end].strip())
        rest = rest[end:]
    return [*cut, rest.strip()] if rest.strip() else cut


@pytest.mark.parametrize(
    "text",
    [
        "Your table is booked for 7 p.m. on Friday. See you then!",
        "Great! Your order number is 4521. Anything else?",
        "Hmm... let me check. Yes, we have a table.",
        "Wait... what? Okay.",
        "Our address is 12 St. James St. in London. Please come by.",
        "We open at 9 a.m. Tomorrow we close early.",
        "Plan B. We go at noon. John F. Kennedy said so. Call Mr. B. Jones now.",
        "Section A. Please read it. Vitamin C. It helps.",
        "The U.K. and the U.S. are allies. Dr. Smith, e.g. today, is in.",
        'I said no! really? He said "Go." Then he left.',
        "She asked \u2018why?\u2019 He said \u201cGo.\u201d Then he left.",
        "It costs 3.5 euros. I paid $5. The rest later.",
        "Your appointment is on Jan. 3 at 5 p.m. in room No. 12. See you then!",
        "Call ext. 204 or see p. 12 of the guide. Thanks!",
    ],
)
async def test_sentences_end_where_pipecat_ends_them(text: str) -> None:
    """A reply is spoken sentence by sentence where a Pipecat bot's TTS would cut it, whole
    or streamed word by word."""
    words = [f"{word} " for word in text.split(" ")]
    assert [s async for s in sentences(pieces(*words))] == pipecats(text)
    assert [s async for s in sentences(pieces(text))] == pipecats(text)


@pytest.mark.parametrize(
    ("text", "pipecat", "flowbus"),
    [
        ("Neither do I. Sorry.", ["Neither do I. Sorry."], ["Neither do I.", "Sorry."]),
        ("Is that Ms. Lee? Yes.", ["Is that Ms.", "Lee?", "Yes."], ["Is that Ms. Lee?", "Yes."]),
        ("That's it… Bye.", ["That's it… Bye."], ["That's it…", "Bye."]),
        ("It is approx. 5 km.", ["It is approx.", "5 km."], ["It is approx. 5 km."]),
    ],
)
async def test_sentences_end_better_than_pipecats_in_a_few_places(
    text: str, pipecat: list[str], flowbus: list[str]
) -> None:
    assert pipecats(text) == pipecat
    assert [s async for s in sentences(pieces(text))] == flowbus


async def test_scripted_llm_streams_its_reply_word_by_word_then_its_calls() -> None:
    call = FunctionCall("book", id="c1")
    llm = ScriptedLLM({"": [LLMResponse(text="Sure, Friday.", function_calls=[call])]})
    parts = [p async for p in llm.stream([], [])]
    assert parts == [
        LLMResponse(text="Sure, "),
        LLMResponse(text="Friday."),
        LLMResponse(function_calls=[call]),
    ]
