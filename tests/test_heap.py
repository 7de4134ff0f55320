"""hesse.set_heap_cache: glibc's mallopt on request, a clear warning where there is none."""

from __future__ import annotations

import platform

import pytest

import hesse
from hesse import heap as _heap


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_applies_and_restores_on_glibc() -> None:
    try:
        assert hesse.set_heap_cache("64MiB") is True
        assert hesse.set_heap_cache(2**28) is True
    finally:
        assert hesse.set_heap_cache(None) is True  # glibc's static defaults again


def test_bad_limit_names_the_api() -> None:
    with pytest.raises(hesse.UnsupportedInputError, match=r"hesse\.set_heap_cache"):
        hesse.set_heap_cache("lots")


def test_without_mallopt_warns_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_heap, "_mallopt", lambda: None)
    with pytest.warns(hesse.HesseWarning, match="no mallopt"):
        assert hesse.set_heap_cache() is False
