"""A module that imports a dependency that is not installed (whose name starts its own)."""

import tests.workers.sdk  # type: ignore[import-not-found]  # noqa: F401
