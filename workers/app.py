"""Loading a user's service from ``module:attr``."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from pathlib import Path

from bus import Service


class AppLoadError(Exception):
    """``module:attr`` does not name a service; the message says what is wrong and how to fix it."""


def load_service(target: str) -> Service:
    """Import ``module:attr`` (``attr`` may be dotted) and return the `Service` it names.

    The attribute may be a `Service`, an object with an ``as_service()`` method (a
    `flows.ActionService` or `flows.EventService`), or a callable with no arguments returning
    either (not an async one). The current directory is importable, as with ``python -m``.
    Every failure, the user's own code raising included, is an `AppLoadError` saying where it
    happened.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise AppLoadError(f"{target!r} is not MODULE:ATTR (for example myapp.services:crm)")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        obj: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name + ".").startswith(exc.name + "."):  # not one it imports
            raise AppLoadError(
                f"cannot import module {module_name!r}: no such module (the current directory "
                f"and the installed packages were searched)"
            ) from None
        raise AppLoadError(f"importing {module_name!r} failed: {exc}") from None
    except (Exception, SystemExit) as exc:  # a script's sys.exit() on import is no service
        raise AppLoadError(f"importing {module_name!r} raised {where(exc)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            known = ", ".join(n for n in dir(obj) if not n.startswith("_"))[:200]
            raise AppLoadError(f"{module_name!r} has no attribute {attr!r} (it has: {known})")
        obj = getattr(obj, part)
    if inspect.iscoroutinefunction(obj):
        raise AppLoadError(
            f"{target} is an async function: the worker calls it before its event loop runs; "
            "make it a plain def returning the service"
        )
    try:
        if callable(obj) and not isinstance(obj, Service) and not hasattr(obj, "as_service"):
            obj = obj()
        as_service = getattr(obj, "as_service", None)
        if callable(as_service):
            obj = as_service()
    except (Exception, SystemExit) as exc:
        raise AppLoadError(f"making the service {target} raised {where(exc)}") from None
    if not isinstance(obj, Service):
        raise AppLoadError(
            f"{target} is a {type(obj).__name__}, not a flowbus Service (nor an ActionService, "
            "an EventService, or a function returning one)"
        )
    return obj


#: Where `importlib.import_module` runs, a frame of every failed import; and flowbus's own
#: packages, whose errors say what is wrong in the user's terms.
_IMPORTLIB = str(Path(importlib.__file__).parent) + os.sep
_FLOWBUS = tuple(str(Path(__file__).parents[1] / p) + os.sep for p in ("bus", "flows", "workers"))


def where(exc: BaseException) -> str:
    """``Type: message (file, line N)`` of the user's code that raised `exc`: the innermost
    frame that is neither Python's import machinery nor a frozen module (``os.environ``) nor
    flowbus (this loader calling a factory with the wrong arguments, a flowbus call refusing
    what it was given). A `SyntaxError` names its place in its message."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(("<frozen ", _IMPORTLIB, *_FLOWBUS))
    ]
    last = frames[-1] if frames else None
    place = f" ({last.filename}, line {last.lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{place}"
