"""The dspex broker daemon: ``python -m broker``."""
