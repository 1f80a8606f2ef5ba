"""Logging: structlog, readable on a terminal and JSON lines otherwise."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Collection
from typing import Any, Literal, TextIO, cast

import structlog
from structlog.typing import EventDict

LogFormat = Literal["auto", "console", "json"]


def configure(level: str = "info", fmt: LogFormat = "auto", quiet: Collection[str] = ()) -> None:
    """Configure structlog for a process; call once at start. The loggers named in `quiet`
    (``structlog.get_logger(name)``) log warnings and errors only."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            _Quiet(frozenset(quiet)),
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=_NamedLoggerFactory(),
        cache_logger_on_first_use=True,
    )


class _NamedLogger(structlog.PrintLogger):
    """A print logger that knows the name it was got by, for `_Quiet`."""

    def __init__(self, name: str) -> None:
        super().__init__(_STDERR)  # one file for all: structlog locks writes per file
        self.name = name


class _NamedLoggerFactory:
    def __call__(self, *args: Any) -> _NamedLogger:
        return _NamedLogger(str(args[0]) if args else "")


class _Quiet:
    """Drops what the loggers named in `names` log below warning."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def __call__(self, logger: Any, method: str, event: EventDict) -> EventDict:
        if method in {"debug", "info"} and getattr(logger, "name", "") in self.names:
            raise structlog.DropEvent
        return event


class _Stderr:
    """``sys.stderr`` for the log lines. Once its reader has gone (``EPIPE``: ``2>&1 | head``,
    a log shipper or journald that went away), the lines go to ``/dev/null`` rather than raise
    into whatever was logging: a handler (failed, retried, dead-lettered for its log line) or
    the consumer's loop (the worker ended, with status 0)."""

    def write(self, text: str) -> int:
        try:
            return sys.stderr.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            sys.stderr.flush()
        except BrokenPipeError:
            self._gone()

    @staticmethod
    def _gone() -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stderr.fileno())
        os.close(devnull)


_STDERR = cast(TextIO, _Stderr())
