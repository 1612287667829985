"""CompleteP: depth-aware muP (Dey et al., 2025) with depth exponent alpha.

With width multiplier m_N = d_model / base_width and depth multiplier m_L = n_layers / base_depth:
  hidden matrices  init std  sigma / sqrt(m_N)     Adam lr  lr / m_N * m_L^(alpha-1)   eps  eps / (m_N m_L^alpha)
  embeddings       init std  sigma                 Adam lr  lr                          eps  eps
  unembedding      init std  sigma, logits * 1/m_N Adam lr  lr                          eps  eps
  norm gains       init 1                          Adam lr  lr * m_L^(alpha-1)          eps  eps
  residual branch  output * m_L^(-alpha)
Every module asks this object for its factors, so the rules live in one place.
"""
from __future__ import annotations

import dataclasses

# Parameter classes; each parameter carries one as metadata `param_class`.
EMBEDDING, HIDDEN, UNEMBEDDING, NORM = "embedding", "hidden", "unembedding", "norm"
PARAM_CLASSES = (EMBEDDING, HIDDEN, UNEMBEDDING, NORM)


@dataclasses.dataclass(frozen=True)
class CompleteP:
  width: int
  depth: int
  base_width: int
  base_depth: int
  init_std: float = 0.02
  alpha: float = 1.0

  @classmethod
  def from_config(cls, model_config) -> "CompleteP":
    m = model_config
    return cls(int(m.d_model), int(m.n_layers), int(m.base_width), int(m.base_depth),
               float(m.init_std), float(m.depth_alpha))

  @property
  def width_mult(self) -> float:
    return self.width / self.base_width

  @property
  def depth_mult(self) -> float:
    return self.depth / self.base_depth

  @property
  def residual_scale(self) -> float:
    return self.depth_mult ** (-self.alpha)

  @property
  def logit_scale(self) -> float:
    return 1.0 / self.width_mult

  def init_std_for(self, param_class: str, fan_in_mult: float = 1.0) -> float:
    """Init std; `fan_in_mult` is fan_in / d_model for hidden matrices whose input is not d_model."""
    if param_class == HIDDEN:
      return self.init_std / (self.width_mult * fan_in_mult) ** 0.5
    return self.init_std

  def lr_mult(self, param_class: str) -> float:
    depth_factor = self.depth_mult ** (self.alpha - 1.0)
    return {HIDDEN: depth_factor / self.width_mult, NORM: depth_factor,
            EMBEDDING: 1.0, UNEMBEDDING: 1.0}[param_class]

  def eps_mult(self, param_class: str) -> float:
    if param_class == HIDDEN:
      return 1.0 / (self.width_mult * self.depth_mult ** self.alpha)
    return 1.0

  def weight_decay_mult(self, param_class: str) -> float:
    """Keeps lr * wd (the AdamW shrink per step) independent of width."""
    return 1.0 / self.lr_mult(param_class) if param_class == HIDDEN else 1.0
