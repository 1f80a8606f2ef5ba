"""The LLM and TTS a bot's `FlowManager` drives, and stand-ins that run offline.

An LLM that can `stream` its reply and a TTS that can `speak_stream` one (both optional)
let `FlowManager` speak a reply's first sentence while the LLM still writes the rest, as
Pipecat does. `ScriptedLLM` answers from a script per node, whole or word by word;
`SimulatedTTS` "speaks" for a time proportional to the text, sentence by sentence, and can be
interrupted, as a caller would. Both report what they do to an optional observer, which the
tests and the demo use to check timing.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Protocol

import anyio
import msgspec

Observer = Callable[[str, str], Awaitable[None]]


class FunctionCall(msgspec.Struct, frozen=True):
    """A function the LLM asked to call, with its arguments, and the id the LLM gave the call
    (its result in the context names it; `FlowManager` makes one if it is empty)."""

    name: str
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)
    id: str = ""


class LLMResponse(msgspec.Struct, frozen=True):
    """One complete LLM reply: text to speak and/or function calls."""

    text: str = ""
    function_calls: list[FunctionCall] = msgspec.field(default_factory=list)


class LLM(Protocol):
    async def generate(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
    ) -> LLMResponse:
        """The complete reply to `messages`, with `tools` available."""
        ...


class StreamingLLM(LLM, Protocol):
    def stream(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
    ) -> AsyncIterator[LLMResponse]:
        """The reply to `messages` in parts, as the LLM writes them: each a piece of its text
        and/or function calls; the reply is their sum."""
        ...


class Spoken(msgspec.Struct, frozen=True):
    """What a caller heard of a text: all of it, or its start, `text`, up to an interruption."""

    text: str
    interrupted: bool = False


class TTS(Protocol):
    async def speak(self, text: str) -> bool | Spoken:
        """Speak `text`; say how much was heard: a `Spoken` (what was spoken goes into the
        LLM's context, as in Pipecat), or True if it was spoken to the end and False if it was
        interrupted (then the whole text goes in: what was heard is not known)."""
        ...


class StreamingTTS(TTS, Protocol):
    async def speak_stream(self, texts: AsyncIterable[str]) -> Spoken:
        """Speak one reply whose `texts` come as the LLM writes them (pieces of any size:
        the TTS makes its sentences), beginning before the last has come; return once the
        last was spoken, or the speech cut short, with what the caller heard of it all."""
        ...


def streams(llm: LLM, tts: TTS) -> bool:
    """Whether a reply of `llm` can be spoken by `tts` as it is written."""
    return callable(getattr(llm, "stream", None)) and callable(getattr(tts, "speak_stream", None))


async def sentences(texts: AsyncIterable[str]) -> AsyncIterator[str]:
    """The sentences of the text that comes in `texts`, each as soon as it is complete, and the
    rest at the end; stripped, none empty. They end where Pipecat's aggregator (sentencex)
    ends them: at the spaces after an end mark (and a closing quote) once the next word has
    begun; after a period or an ellipsis, not before a word in lower case ("at 7 p.m. on
    Friday", "Hmm... let me see"), nor after a title ("Dr. Smith") or an initial ("John F.
    Kennedy") unless a word that opens sentences follows ("Plan A. Then"), nor before a number
    that a word such as "No." or "Jan." numbers ("on Jan. 3").

    Where Pipecat's are wrong they differ: it ends none in "Neither do I. Sorry." or "That's
    it… Bye.", and one inside "Is that Ms. Lee?" and "approx. 5 km"."""
    pending = ""
    async for text in texts:
        pending += text
        *complete, pending = _SENTENCE_END.split(pending)
        for sentence in complete:
            if sentence.strip():
                yield sentence.strip()
    if pending.strip():
        yield pending.strip()


#: An initial: a capital letter but "I" ("Neither do I." ends a sentence).
_INITIAL = "[A-HJ-Z]"
#: Words whose period ends no sentence: titles, "e.g.", an initial.
_ABBREVIATIONS = [*r"Mr Mrs Ms Dr Prof St Jr Sr vs e\.g i\.e".split(), _INITIAL]
#: Words that open sentences, but seldom follow an initial in a name: after one, they tell a
#: sentence that ended with a letter ("Plan B. We go") from a name ("John F. Kennedy").
_OPENERS = """About After Again Also Although And Another Any Are As At Because Before Both
    But By Can Could Did Do Does Don't Each Every Finally First For From Great Had Has Have He
    Her Here His How However If In Is It Its Just Let Maybe My Next No Now Of On Once Only Or
    Our Please She So Some Still That The Their Then There These They This Those Today
    Tomorrow Was We Were What When Where Which While Who Why Will With Would Yes You
    Your""".split()
#: Words whose period ends no sentence before a number: "No. 5", "Jan. 3", "p. 12".
_BEFORE_NUMBERS = """No Nos Nr Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec Fig Figs p pp
    ext ca approx Vol Ch Sec Art""".split()
#: Closing quotes and brackets, which may follow an end mark.
_CLOSING = r"\"'\u201d\u2019)\]"


def _after(marks: str) -> str:
    """Right after one of `marks`, or after one and a closing quote or bracket."""
    return rf"(?:(?<=[{marks}])|(?<=[{marks}][{_CLOSING}]))"


#: Where a sentence ends: at the spaces after an end mark, once the next word has begun (a
#: stream's text waits for its first letter, and after an initial for an opener's end); after
#: a period or an ellipsis only if that word is not in lower case.
_SENTENCE_END = re.compile(
    # (a lookbehind for each abbreviation: they differ in length)
    "".join(rf"(?<!\b{word}\.)" for word in _ABBREVIATIONS)
    + _after(".…")
    + "".join(rf"(?!(?<=\b{word}\.)\s+\d)" for word in _BEFORE_NUMBERS)
    + r"\s+(?=[^\sa-z])"
    + rf"|{_after('!?')}\s+(?=\S)"
    + rf"|(?<=\b{_INITIAL}\.)\s+(?=(?:{'|'.join(_OPENERS)})[\s,;:.!?…])"
)


def heard(text: str, said: bool | Spoken) -> Spoken:
    """What `TTS.speak(text)`, which returned `said`, was heard to say."""
    return said if isinstance(said, Spoken) else Spoken(text, interrupted=not said)


#: The node `FlowManager` asks the LLM to reply in, while it waits for the reply: for stand-ins
#: such as `ScriptedLLM` (a real LLM goes by the context, which holds no node names).
CURRENT_NODE: ContextVar[str] = ContextVar("flowbus_current_node", default="")


async def _ignore(kind: str, detail: str) -> None:
    pass


class ScriptedLLM:
    """Replies from `script`: node name -> replies, used in turn (the last one repeats).

    The node is the one `FlowManager` asks for a reply in (`CURRENT_NODE`), so a script follows
    the flow. `observer("llm.started", node)` is awaited before each reply. `stream` writes a
    reply word by word, `seconds_per_word` apart, then its function calls.
    """

    def __init__(
        self,
        script: Mapping[str, Sequence[LLMResponse]],
        *,
        observer: Observer = _ignore,
        seconds_per_word: float = 0.0,
    ) -> None:
        self.script = {node: list(replies) for node, replies in script.items()}
        self.observer = observer
        self.seconds_per_word = seconds_per_word
        self.calls: list[str] = []

    async def generate(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
    ) -> LLMResponse:
        node = CURRENT_NODE.get()
        await self.observer("llm.started", node)
        self.calls.append(node)
        replies = self.script.get(node) or [LLMResponse()]
        return replies.pop(0) if len(replies) > 1 else replies[0]

    async def stream(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
    ) -> AsyncIterator[LLMResponse]:
        reply = await self.generate(messages, tools)
        for word in re.findall(r"\S+\s*", reply.text):
            await anyio.sleep(self.seconds_per_word)
            yield LLMResponse(text=word)
        if reply.function_calls:
            yield LLMResponse(function_calls=reply.function_calls)


class SimulatedTTS:
    """Speaks one text at a time, in order, for `seconds_per_char` per character.

    `interrupt()` cuts the phrase being spoken short, as a caller talking over the bot would:
    the words whose last character was spoken by then were heard.
    `observer("tts.started" | "tts.finished" | "tts.interrupted", text)` is awaited around each.
    """

    def __init__(self, seconds_per_char: float = 0.001, *, observer: Observer = _ignore) -> None:
        self.seconds_per_char = seconds_per_char
        self.observer = observer
        self.spoken: list[str] = []
        self._turn = anyio.Lock()
        self._current: anyio.CancelScope | None = None

    async def speak(self, text: str) -> Spoken:
        async with self._turn:
            scope = self._current = anyio.CancelScope()  # interruptible from the first moment
            await self.observer("tts.started", text)
            started = anyio.current_time()
            with scope:
                await anyio.sleep(len(text) * self.seconds_per_char)
            self._current, interrupted = None, scope.cancel_called
            await self.observer("tts.interrupted" if interrupted else "tts.finished", text)
            if not interrupted:
                self.spoken.append(text)
                return Spoken(text)
            elapsed = anyio.current_time() - started
            chars = int(elapsed / self.seconds_per_char) if self.seconds_per_char else 0
            return Spoken(_words_within(text, chars), interrupted=True)

    async def speak_stream(self, texts: AsyncIterable[str]) -> Spoken:
        """Speak the sentences of `texts` as each is complete, one after another; an
        interruption stops the speech there, the rest is not spoken."""
        said: list[str] = []
        async for sentence in sentences(texts):
            spoken = await self.speak(sentence)
            said.append(spoken.text)
            if spoken.interrupted:
                return Spoken(" ".join(filter(None, said)), interrupted=True)
        return Spoken(" ".join(said))

    def interrupt(self) -> bool:
        """Stop the phrase being spoken; False if nothing was being spoken."""
        if self._current is None:
            return False
        self._current.cancel()
        return True


def _words_within(text: str, chars: int) -> str:
    """The words of `text` that end within its first `chars` characters."""
    if chars >= len(text) or text[chars].isspace():
        return text[:chars].rstrip()
    return _PART_WORD.sub("", text[:chars]).rstrip()  # a word cut short: up to any whitespace


_PART_WORD = re.compile(r"\S*\Z")
