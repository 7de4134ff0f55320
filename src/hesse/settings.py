"""Per-call settings of hesse, as a context manager (no process-wide switches).

>>> import hesse
>>> with hesse.settings(autotune=False):
...     hesse.settings.current().autotune
False
>>> hesse.settings.current().autotune
True
>>> hesse.settings.current().compile
'auto'
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, fields, replace
from typing import Literal

from .errors import UnsupportedInputError


@dataclass(frozen=True)
class Settings:
    """What the calls in a ``with hesse.settings(...)`` block use.

    Attributes:
        autotune: ``strategy="auto"`` times its close candidates on repeated calls and
            keeps the fastest (see :mod:`hesse.planning.tuning`).
        compile: Whether the structured engine's derivative programs (the whole pass of
            a repeated request, its backward included under ``create_graph=True``) run
            through ``torch.compile``. ``"auto"``: when that pays, by the ski-rental rule
            of :mod:`hesse.engine.compiling` (compiled once the time compiling would have
            saved reaches its cost; then kept only if faster). ``True``: always, and the
            engine's elementwise kernels too. ``False``: never. Compiling takes seconds
            and needs a C++ compiler on CPU; a failure warns once per program and runs
            it eagerly. ``Plan.program`` says what was decided and why.
    """

    autotune: bool = True
    compile: bool | Literal["auto"] = "auto"


_DEFAULT = Settings()  # frozen: safe to share
_ALLOWED: dict[str, tuple[bool | str, ...]] = {
    "autotune": (True, False),
    "compile": (True, False, "auto"),
}
_CURRENT: ContextVar[Settings] = ContextVar("hesse_settings", default=_DEFAULT)


class _SettingsFront:
    """``hesse.settings(...)``: a context manager; ``hesse.settings.current()``: the values."""

    @staticmethod
    def current() -> Settings:
        """The settings in force in this thread (or task)."""
        return _CURRENT.get()

    @contextlib.contextmanager
    def __call__(self, **changes: bool | str) -> Iterator[Settings]:
        """Changes settings for the calls inside the block (this thread or task only).

        Args:
            **changes: ``autotune=`` (True/False) and/or ``compile=`` (True, False or
                ``"auto"``).

        Raises:
            UnsupportedInputError: An unknown name or a value it does not take.
        """
        known = {f.name for f in fields(Settings)}
        for name, value in changes.items():
            allowed = _ALLOWED.get(name, ())
            if not any(value is a or (isinstance(a, str) and value == a) for a in allowed):
                raise UnsupportedInputError(
                    f"hesse.settings: expected autotune=True/False and/or "
                    f"compile=True/False/'auto' (names: {', '.join(sorted(known))}), "
                    f"got {name}={value!r}."
                )
        token = _CURRENT.set(replace(_CURRENT.get(), **changes))
        try:
            yield _CURRENT.get()
        finally:
            _CURRENT.reset(token)


settings = _SettingsFront()
