"""tmdiff.kernels."""
