"""hesse benchmark suite: cases, peer methods, the measurement protocol and the report.

Not shipped in the wheel. Run it from the repository root with ``python -m benchmarks.run``
(or ``hesse bench``); see ``benchmarks/README.md``.
"""
