"""A module whose import fails in the user's own code, for the worker's error message."""

raise RuntimeError("the CRM credentials are missing")
