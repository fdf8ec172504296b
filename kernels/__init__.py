"""Numba kernels. Each takes its output buffer as an argument and allocates nothing."""
