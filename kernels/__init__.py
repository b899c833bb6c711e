"""Pallas kernels, imported as `lmjax.kernels` (setup.py maps this folder)."""
