"""DSPy conformance: each case is a DSPy program run in-process and through a dspex session."""
