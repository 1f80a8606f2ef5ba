"""Logging: structlog, readable on a terminal and JSON lines otherwise."""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal, TextIO, cast

import structlog

LogFormat = Literal["auto", "console", "json"]


def configure(level: str = "info", fmt: LogFormat = "auto") -> None:
    """Configure structlog for a process; call once at start."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(cast(TextIO, _Stderr())),
        cache_logger_on_first_use=True,
    )


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
