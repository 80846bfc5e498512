"""Runtime switches scoped in a context (like scikit-learn's ``config_context``).

The configuration is held in a :class:`contextvars.ContextVar`, so a ``with
config_context(...)`` block changes it for the current thread/task only and restores
it on exit.  Defaults come from environment variables, read once on first use (so an
invalid value is an :class:`~aslcal.errors.InputError` when the configuration is first
needed, not a failed ``import aslcal``):

``ASLCAL_BACKEND``  ``auto`` | ``numpy`` | ``numba`` | ``cuda``   (default ``auto``)
``ASLCAL_DTYPE``    ``auto`` | ``float32`` | ``float64``          (default ``auto``:
                    float32 on the CUDA path, float64 on the CPU)
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any, Mapping

from .errors import InputError

__all__ = ["get_config", "set_config", "config_context", "BACKENDS", "DTYPES"]

BACKENDS = ("auto", "numpy", "numba", "cuda")
DTYPES = ("auto", "float32", "float64")


def _validate(key: str, value: Any) -> Any:
    if key == "backend":
        if value not in BACKENDS:
            raise InputError(f"backend={value!r}: expected one of {', '.join(BACKENDS)}")
        return value
    if key == "dtype":
        name = getattr(value, "__name__", None) or str(value)
        name = {"float": "float64", "single": "float32", "double": "float64"}.get(name, name)
        if name not in DTYPES:
            raise InputError(f"dtype={value!r}: expected one of {', '.join(DTYPES)}")
        return name
    if key == "progress":
        return bool(value)
    raise InputError(f"unknown configuration key {key!r}: expected backend, dtype or progress")


def _from_env(skip: Any = ()) -> dict[str, Any]:
    """The defaults with the environment's values; the keys in ``skip`` are not read."""
    cfg: dict[str, Any] = {"backend": "auto", "dtype": "auto", "progress": True}
    env = {"backend": "ASLCAL_BACKEND", "dtype": "ASLCAL_DTYPE"}
    for key, var in env.items():
        if key in skip:
            continue
        if os.environ.get(var, "").strip():  # empty or blank: unset
            try:
                cfg[key] = _validate(key, os.environ[var].strip().lower())
            except InputError as exc:
                raise InputError(f"environment variable {var}: {exc}") from None
    return cfg


_CONFIG: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("aslcal_config")
_ENV_DEFAULTS: Mapping[str, Any] | None = None


def get_config() -> Mapping[str, Any]:
    """Return the current configuration (read-only mapping: backend, dtype, progress).

    Raises
    ------
    InputError
        An invalid ``ASLCAL_BACKEND`` / ``ASLCAL_DTYPE`` (when no context set one).
    """
    global _ENV_DEFAULTS
    try:
        return _CONFIG.get()
    except LookupError:  # nothing set in this context: the environment's defaults
        if _ENV_DEFAULTS is None:
            _ENV_DEFAULTS = MappingProxyType(_from_env())
        return _ENV_DEFAULTS


def _base(changes: Mapping[str, Any]) -> Mapping[str, Any]:
    """The configuration ``changes`` start from: the current one; without one in this
    context, the environment's, not reading the variables that ``changes`` override (an
    invalid one of those does not matter then)."""
    try:
        return _CONFIG.get()
    except LookupError:
        overridden = {k for k, v in changes.items() if v is not None}
        return get_config() if not overridden else _from_env(skip=overridden)


def _merged(changes: Mapping[str, Any]) -> Mapping[str, Any]:
    """The configuration with ``changes`` (None values ignored) applied and validated."""
    cfg = dict(_base(changes))
    for key, value in changes.items():
        if value is not None:
            cfg[key] = _validate(key, value)
    return MappingProxyType(cfg)


def set_config(**changes: Any) -> None:
    """Change the configuration for the current context (prefer :func:`config_context`)."""
    _CONFIG.set(_merged(changes))


@contextlib.contextmanager
def config_context(**changes: Any) -> Iterator[Mapping[str, Any]]:
    """Temporarily change the configuration inside a ``with`` block.

    Examples
    --------
    >>> from aslcal import config_context, get_config
    >>> with config_context(backend="numba", dtype="float32"):
    ...     get_config()["dtype"]
    'float32'
    """
    token = _CONFIG.set(_merged(changes))
    try:
        yield _CONFIG.get()
    finally:
        _CONFIG.reset(token)
