"""``python -m hesse``: the same as the ``hesse`` command."""

from hesse.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
