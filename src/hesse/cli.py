"""The ``hesse`` command line: ``hesse demo``, ``hesse compute``, ``hesse bench``, ``--version``.

A thin shell over the library. Every :class:`hesse.HesseError` subclass has its own exit
code (:data:`EXIT_CODES`) and is reported as one line on stderr, without a traceback;
so is a missing optional dependency (:data:`EXIT_MISSING_DEPENDENCY`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from hesse import errors

__all__ = ["EXIT_CODES", "EXIT_MISSING_DEPENDENCY", "EXIT_NOT_A_CHECKOUT", "main"]

EXIT_USAGE = 2
"""Bad command line (argparse's own code)."""
EXIT_NOT_A_CHECKOUT = 3
"""``hesse bench`` run outside a repository checkout."""
EXIT_MISSING_DEPENDENCY = 4
"""An optional dependency (matplotlib, scikit-learn, ...) is not installed."""
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[type[errors.HesseError], int] = {
    errors.HesseError: 10,
    errors.UnsupportedInputError: 11,
    errors.OutputSelectionError: 12,
    errors.UnsupportedModelError: 13,
    errors.NonFiniteError: 14,
    errors.DeviceMismatchError: 15,
    errors.NonDeterministicModelError: 16,
    errors.BatchCouplingError: 17,
    errors.MemoryBudgetError: 18,
    errors.StrategyError: 19,
    errors.StrategyMismatchError: 20,
    errors.FileFormatError: 21,
    errors.UnsafeFileError: 22,
    errors.OutputExistsError: 23,
    errors.OutputWriteError: 24,
    errors.ResumeMismatchError: 25,
    errors.MissingDependencyError: 26,
    errors.PlanMismatchError: 27,
}
"""Exit code of each error class; a subclass not listed uses its nearest listed base."""

_BENCH_MARKER = Path("benchmarks") / "run.py"
_PACKAGE_DIR = Path(__file__).resolve().parent


def exit_code_for(exc: errors.HesseError) -> int:
    """Return the exit code of a hesse error: its class's, or its nearest base's.

    Args:
        exc: The error.

    Returns:
        An integer in ``EXIT_CODES.values()``.
    """
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_CODES[errors.HesseError]


def _version_text() -> str:
    """Return ``"hesse X, torch Y"``."""
    import torch

    hesse_version = getattr(sys.modules.get("hesse"), "__version__", None)
    if hesse_version is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            hesse_version = version("hesse")
        except PackageNotFoundError:
            hesse_version = "unknown"
    return f"hesse {hesse_version}, torch {torch.__version__}"


def _build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with its ``demo`` and ``bench`` subcommands."""
    parser = argparse.ArgumentParser(
        prog="hesse",
        description="Input Jacobians, Hessians, Hessian diagonals and Laplacians of "
        "PyTorch models.",
    )
    parser.add_argument("--version", action="store_true", help="print hesse and torch versions")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train a small digits CNN and plot its input Hessian (offline, ~30 s)",
        description="Train a small CNN on scikit-learn's 8x8 digits, compute input "
        "Hessians with hesse, time them against torch.func.hessian and save a PNG.",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("hesse-demo"),
        metavar="DIR",
        help="output folder for hessian.png (default: ./hesse-demo)",
    )
    demo.add_argument("--quick", action="store_true", help="fewer epochs, smaller batch")
    demo.add_argument("--no-plot", action="store_true", help="do not save the PNG")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    from hesse.compute import add_compute_parser

    add_compute_parser(sub)
    sub.add_parser(
        "bench",
        help="run the benchmarks (repository checkout only); arguments go to benchmarks/run.py",
        add_help=False,
    )
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    """Run ``hesse demo`` and print its summary; return the exit code."""
    from hesse.demo import format_summary, run_demo

    isatty = getattr(sys.stderr, "isatty", None)
    progress = not args.quiet and callable(isatty) and bool(isatty())
    result = run_demo(
        args.out, quick=args.quick, plot=not args.no_plot, seed=args.seed, progress=progress
    )
    print(format_summary(result))
    return 0


def find_repo_root(start: Path, package_dir: Path) -> Path | None:
    """Find the repository checkout that holds ``benchmarks/run.py``.

    Args:
        start: Folder to search upwards from first (usually the working directory).
        package_dir: Folder of the installed package, searched upwards second.

    Returns:
        The repository root, or ``None`` outside a checkout.
    """
    for origin in (start, package_dir):
        origin = origin.resolve()
        for folder in (origin, *origin.parents):
            if (folder / _BENCH_MARKER).is_file():
                return folder
    return None


def _run_bench(argv: list[str]) -> int:
    """Run ``benchmarks.run.main(argv)`` from the repository checkout."""
    root = find_repo_root(Path.cwd(), _PACKAGE_DIR)
    if root is None:
        _error(
            "hesse bench: benchmarks/run.py not found above the working directory or the "
            "installed package; run it from a clone of the hesse repository",
        )
        return EXIT_NOT_A_CHECKOUT
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        bench = importlib.import_module("benchmarks.run")
    except ModuleNotFoundError as exc:
        raise ImportError(f"hesse bench: {exc}; pip install 'hesse[bench]'") from exc
    code = bench.main(argv)
    return code if isinstance(code, int) else 0


def _error(message: str) -> None:
    """Print ``hesse: error: <first line of message>`` on stderr."""
    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    print(f"hesse: error: {first_line}", file=sys.stderr)


def _dispatch(argv: list[str]) -> int:
    """Parse ``argv`` and run the chosen command; exceptions propagate."""
    if argv and argv[0] == "bench":
        return _run_bench(argv[1:])
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(_version_text())
        return 0
    if args.command == "demo":
        return _run_demo(args)
    if args.command == "compute":
        from hesse.compute import run_compute

        return run_compute(args)
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hesse`` command line.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when ``None``.

    Returns:
        The exit code: 0 on success, :data:`EXIT_USAGE` for a bad command line,
        :data:`EXIT_CODES` for hesse errors, :data:`EXIT_MISSING_DEPENDENCY` for a
        missing optional dependency, :data:`EXIT_NOT_A_CHECKOUT` for ``bench``
        outside a repository checkout.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except SystemExit as exc:  # argparse: --help or a usage error
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except errors.HesseError as exc:
        _error(f"{type(exc).__name__}: {exc}")
        return exit_code_for(exc)
    except ImportError as exc:
        _error(str(exc))
        return EXIT_MISSING_DEPENDENCY
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
