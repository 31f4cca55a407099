"""The dspex worker daemon: ``python -m worker --pool NAME``."""
