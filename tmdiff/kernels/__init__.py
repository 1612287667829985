"""tmdiff.kernels: one dispatch API per op, a jnp reference for each, Pallas kernels."""
from tmdiff.kernels.attention import attend
from tmdiff.kernels.cross_entropy import masked_cross_entropy

__all__ = ["attend", "masked_cross_entropy"]
