"""Per-call settings of hesse, as a context manager (no process-wide switches).

>>> import hesse
>>> with hesse.settings(autotune=False):
...     hesse.settings.current().autotune
False
>>> hesse.settings.current().autotune
True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, fields, replace

from .errors import UnsupportedInputError


@dataclass(frozen=True)
class Settings:
    """What the calls in a ``with hesse.settings(...)`` block use.

    Attributes:
        autotune: ``strategy="auto"`` times its close candidates on repeated calls and
            keeps the fastest (see :mod:`hesse.planning.tuning`).
        compile: Run the structured engine's memory-bound kernels through
            ``torch.compile`` (the first call per shape compiles for about a second and
            needs a C++ compiler on CPU; a failure warns once and runs eagerly).
    """

    autotune: bool = True
    compile: bool = False


_DEFAULT = Settings()  # frozen: safe to share
_CURRENT: ContextVar[Settings] = ContextVar("hesse_settings", default=_DEFAULT)


class _SettingsFront:
    """``hesse.settings(...)``: a context manager; ``hesse.settings.current()``: the values."""

    @staticmethod
    def current() -> Settings:
        """The settings in force in this thread (or task)."""
        return _CURRENT.get()

    @contextlib.contextmanager
    def __call__(self, **changes: bool) -> Iterator[Settings]:
        """Changes settings for the calls inside the block (this thread or task only).

        Args:
            **changes: ``autotune=`` and/or ``compile=`` (booleans).

        Raises:
            UnsupportedInputError: An unknown name or a non-boolean value.
        """
        known = {f.name for f in fields(Settings)}
        for name, value in changes.items():
            if name not in known or not isinstance(value, bool):
                raise UnsupportedInputError(
                    f"hesse.settings: expected {', '.join(sorted(known))} as True/False, "
                    f"got {name}={value!r}."
                )
        token = _CURRENT.set(replace(_CURRENT.get(), **changes))
        try:
            yield _CURRENT.get()
        finally:
            _CURRENT.reset(token)


settings = _SettingsFront()
