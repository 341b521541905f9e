"""Triton kernels for the codec hot path, each beside its ``*_reference`` torch function."""
