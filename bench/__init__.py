"""dspex benchmarks: ``python -m bench [--smoke] [--only NAME] [--json PATH]``.

See docs/benchmarks.md for what each figure measures, against which baseline, and the latest
results.
"""
