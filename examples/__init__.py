"""Runnable dspex examples (the flagship flow)."""
