"""tmdiff: tri-modal masked diffusion pretraining in JAX."""
