"""Exceptions raised by aslcal.

Every error aslcal raises on purpose derives from :class:`AslcalError`.  Errors that
mean "the caller gave something wrong" also derive from the matching built-in
(``ValueError``, ``RuntimeError``) so that generic handlers keep working.
"""

from __future__ import annotations

__all__ = ["AslcalError", "InputError", "BackendUnavailableError"]


class AslcalError(Exception):
    """Base class of every exception aslcal raises deliberately."""


class InputError(AslcalError, ValueError):
    """Bad input: the message names the argument, the value and what was expected."""


class BackendUnavailableError(AslcalError, RuntimeError):
    """An explicitly requested array/kernel backend cannot be used here (message says why)."""
