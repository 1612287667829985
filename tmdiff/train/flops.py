"""Training FLOPs and MFU. Attention is bidirectional: every query sees every key, so its
FLOPs are not halved as a causal LM's are."""
from __future__ import annotations

import jax

# Dense bf16 peak FLOP/s per device (datasheets).
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "h800": 989e12, "a100": 312e12, "b200": 2250e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
    "tpu v5": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}


def param_counts(model_cfg, vocab_padded: int) -> dict:
  m = model_cfg
  attn = m.d_model * m.head_dim * (2 * m.n_heads + 2 * m.n_kv_heads) + 2 * m.head_dim
  mlp = 3 * m.d_model * m.d_ff
  block = attn + mlp + 2 * m.d_model
  embed = vocab_padded * m.d_model + 3 * m.d_model
  unembed = m.d_model * vocab_padded
  non_embedding = m.n_layers * block + m.d_model
  return {"non_embedding": non_embedding, "embedding": embed, "unembedding": unembed,
          "total": non_embedding + embed + unembed}


def train_flops_per_token(model_cfg, vocab_padded: int, seq_len: int) -> float:
  """Forward + backward FLOPs per token: 6 x matmul params + bidirectional attention."""
  m = model_cfg
  counts = param_counts(model_cfg, vocab_padded)
  matmul_params = counts["non_embedding"] + counts["unembedding"]
  attention = 2 * 2 * m.n_layers * seq_len * m.n_heads * m.head_dim  # QK^T and PV, forward
  return 6.0 * matmul_params + 3.0 * attention


def peak_flops(device=None) -> float | None:
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name in kind:
      return PEAK_FLOPS[name]
  return None
