"""dspex's tests. A package so that tests and the benchmarks import shared pieces as ``tests.…``
(pytest puts the repo root on sys.path for a package; ``python -m bench`` runs from the root)."""
