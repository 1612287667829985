"""tmdiff.diffusion."""
