from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hesse.demo
from hesse import cli, errors


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hesse ")
    assert f"torch {torch.__version__}" in out


def test_python_dash_m_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hesse", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "torch" in proc.stdout


def test_bad_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == cli.EXIT_USAGE
    assert "invalid choice" in capsys.readouterr().err


def test_no_subcommand_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == cli.EXIT_USAGE
    assert "demo" in capsys.readouterr().err


def test_demo_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--help"]) == 0
    assert "--quick" in capsys.readouterr().out


def test_demo_quick_writes_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo-out"
    assert cli.main(["demo", "--quick", "--quiet", "--out", str(out), "--seed", "1"]) == 0
    png = out / "hessian.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "test accuracy" in text
    assert str(png) in text


def test_demo_no_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = hesse.demo.run_demo(tmp_path, quick=True, plot=False, echo=lambda _: None)
    assert result.png_path is None
    assert not list(tmp_path.iterdir())
    assert result.hessian_shape == (64, 64)
    assert result.batch_shape == (hesse.demo.QUICK.batch, 64, 64)
    scale = max(result.max_abs_hessian, 1.0)
    assert result.max_abs_diff <= 1e-4 * scale
    assert result.single_vs_batch_diff <= 1e-4 * scale
    assert result.diag_diff <= 1e-4 * scale
    assert result.tuning.startswith("settled on ")  # timed after auto has settled
    assert "settled on" in hesse.demo.format_summary(result)


def test_bench_outside_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_PACKAGE_DIR", tmp_path)
    assert cli.main(["bench", "--quick"]) == cli.EXIT_NOT_A_CHECKOUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "benchmarks/run.py not found" in err
    assert "Traceback" not in err


def test_bench_in_checkout_forwards_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench_dir = tmp_path / "benchmarks"
    bench_dir.mkdir()
    # a regular package: a namespace one would lose to the real benchmarks/ on sys.path
    (bench_dir / "__init__.py").write_text("")
    (bench_dir / "run.py").write_text(
        "SEEN = []\ndef main(argv):\n    SEEN.append(list(argv))\n    return 7\n"
    )
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    monkeypatch.setattr(cli, "_PACKAGE_DIR", tmp_path / "sub")
    monkeypatch.setattr(sys, "path", list(sys.path))
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "benchmarks"}
    try:
        for key in saved:
            del sys.modules[key]
        assert cli.main(["bench", "--repeats", "2", "--help"]) == 7
        assert sys.modules["benchmarks.run"].SEEN == [["--repeats", "2", "--help"]]
    finally:
        for key in [k for k in sys.modules if k.split(".")[0] == "benchmarks"]:
            del sys.modules[key]
        sys.modules.update(saved)


def _error_classes() -> list[type[errors.HesseError]]:
    return [
        obj
        for obj in vars(errors).values()
        if inspect.isclass(obj) and issubclass(obj, errors.HesseError)
    ]


def test_every_error_class_has_its_own_exit_code() -> None:
    classes = _error_classes()
    assert set(classes) == set(cli.EXIT_CODES)
    codes = [cli.EXIT_CODES[c] for c in classes]
    assert len(set(codes)) == len(codes)
    reserved = {0, 1, cli.EXIT_USAGE, cli.EXIT_NOT_A_CHECKOUT, cli.EXIT_MISSING_DEPENDENCY}
    assert not reserved & set(codes)


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_errors_map_to_exit_codes(
    cls: type[errors.HesseError],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise cls("hesse.hessian: something went wrong\nsecond line")

    monkeypatch.setattr(hesse.demo, "run_demo", fail)
    assert cli.main(["demo", "--quiet"]) == cli.EXIT_CODES[cls]
    err = capsys.readouterr().err
    assert err == f"hesse: error: {cls.__name__}: hesse.hessian: something went wrong\n"


def test_unlisted_subclass_uses_nearest_base() -> None:
    class Custom(errors.StrategyError):
        pass

    assert cli.exit_code_for(Custom("x")) == cli.EXIT_CODES[errors.StrategyError]


def test_missing_dependency(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise ImportError("hesse demo: scikit-learn is required; pip install 'hesse[demo]'")

    monkeypatch.setattr(hesse.demo, "run_demo", fail)
    assert cli.main(["demo"]) == cli.EXIT_MISSING_DEPENDENCY
    assert "pip install 'hesse[demo]'" in capsys.readouterr().err
