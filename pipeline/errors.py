"""The project's own error types: the ones a command line reports as one ``error:`` line.

Everything else (a bug, a Ray task failure) keeps its traceback. Each error's message names
what is wrong (a config key, a storage URI, a counts column) and what to do about it.
"""
from __future__ import annotations


class MsdsmoothError(Exception):
    """Base of the errors caused by the user's input (config, storage, data), not by a bug."""


class StorageError(MsdsmoothError, RuntimeError):
    """Storage cannot be reached, read or written; raised before any model work."""


def describe(exc: BaseException) -> str:
    """A one-line cause for a storage exception, with a hint for missing credentials."""
    text = f"{type(exc).__name__}: {exc}"
    if "Credentials" in type(exc).__name__ or "credential" in str(exc).lower():
        text += " (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a role in the environment)"
    return text
