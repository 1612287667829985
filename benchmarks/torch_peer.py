"""The PyTorch peer: the same model and train step in idiomatic PyTorch, for a side-by-side.

  python3 benchmarks/torch_peer.py --d_model=2048 --n_layers=22 --kv_ratio=4 --ff_mult=4.125 \
      --seq_len=2048 --batch=8

Same architecture as tmdiff.model.transformer (token + modality embeddings, pre-norm RMSNorm,
QK-norm, RoPE, grouped-query attention, SwiGLU, CompleteP residual and logit scales, fp32
parameters) and the same objective (linear-schedule masked diffusion, loss on masked tokens
weighted 1/t), written the way a PyTorch user would: bf16 autocast, SDPA (flash) attention,
torch.compile, fused AdamW with gradient clipping, full-vocabulary logits. Rows are unpacked
(one document each), which the flash kernel supports without a mask. Flags match
benchmarks/train_step_bench.py; FLOPs use the same count (tmdiff.train.flops).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # tmdiff's FLOP count imports JAX; keep it off the GPU
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks.train_step_bench import model_config  # noqa: E402
from tmdiff.data.vocab import VocabLayout  # noqa: E402
from tmdiff.train import flops as flops_lib  # noqa: E402


class RMSNorm(nn.Module):

  def __init__(self, dim, eps):
    super().__init__()
    self.eps = eps
    self.scale = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale).to(x.dtype)


def rope(x, cos, sin):  # x [B, H, T, D]
  x1, x2 = x.float().chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Block(nn.Module):

  def __init__(self, m, residual_scale):
    super().__init__()
    d, self.h, self.k, self.hd = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim
    self.attn_norm, self.mlp_norm = RMSNorm(d, m.norm_eps), RMSNorm(d, m.norm_eps)
    self.wq = nn.Linear(d, self.h * self.hd, bias=False)
    self.wkv = nn.Linear(d, 2 * self.k * self.hd, bias=False)
    self.wo = nn.Linear(self.h * self.hd, d, bias=False)
    self.q_norm, self.k_norm = RMSNorm(self.hd, m.norm_eps), RMSNorm(self.hd, m.norm_eps)
    self.w_gate_up = nn.Linear(d, 2 * m.d_ff, bias=False)
    self.w_down = nn.Linear(m.d_ff, d, bias=False)
    self.rs = residual_scale

  def forward(self, x, cos, sin):
    b, t, _ = x.shape
    y = self.attn_norm(x)
    q = self.wq(y).view(b, t, self.h, self.hd)
    k, v = self.wkv(y).view(b, t, 2, self.k, self.hd).unbind(2)
    q = rope(self.q_norm(q).transpose(1, 2), cos, sin)
    k = rope(self.k_norm(k).transpose(1, 2), cos, sin)
    o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), enable_gqa=self.h != self.k)
    x = x + self.rs * self.wo(o.transpose(1, 2).reshape(b, t, -1))
    gate, up = self.w_gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
    return x + self.rs * self.w_down(F.silu(gate) * up)


class Model(nn.Module):

  def __init__(self, m, vocab):
    super().__init__()
    width_mult, depth_mult = m.d_model / m.base_width, m.n_layers / m.base_depth
    self.embed = nn.Embedding(vocab, m.d_model)
    self.modality_embed = nn.Embedding(3, m.d_model)
    self.blocks = nn.ModuleList(Block(m, depth_mult ** -m.depth_alpha) for _ in range(m.n_layers))
    self.final_norm = RMSNorm(m.d_model, m.norm_eps)
    self.unembed = nn.Linear(m.d_model, vocab, bias=False)
    self.logit_scale = 1.0 / width_mult
    for name, p in self.named_parameters():
      if p.dim() == 2:
        std = m.init_std / (math.sqrt(width_mult) if name.startswith("blocks") else 1.0)
        nn.init.trunc_normal_(p, std=std, a=-3 * std, b=3 * std)
    freqs = m.rope_theta ** (-torch.arange(0, m.head_dim // 2).float() / (m.head_dim // 2))
    self.register_buffer("freqs", freqs, persistent=False)

  def forward(self, tokens, modality):
    t = tokens.shape[1]
    angles = torch.arange(t, device=tokens.device).float()[:, None] * self.freqs
    cos, sin = angles.cos(), angles.sin()
    x = self.embed(tokens) + self.modality_embed(modality)
    for block in self.blocks:
      x = block(x, cos, sin)
    return self.unembed(self.final_norm(x)) * self.logit_scale


def diffusion_loss(model, tokens, modality, mask_id, t_min=1e-3):
  b, t = tokens.shape
  time_ = t_min + (1 - t_min) * torch.rand(b, 1, device=tokens.device)
  masked = torch.rand(b, t, device=tokens.device) < time_
  with torch.autocast(tokens.device.type, dtype=torch.bfloat16):
    logits = model(torch.where(masked, mask_id, tokens), modality)
  ce = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none")
  return (ce.view(b, t) * masked / time_).sum() / (b * t)


def main():
  from benchmarks.train_step_bench import add_model_args
  p = argparse.ArgumentParser()
  add_model_args(p)
  p.add_argument("--compile_mode", default="default")
  args = p.parse_args()
  torch.backends.cuda.matmul.allow_tf32 = True
  c = model_config(args)
  m = c.model
  layout = VocabLayout.from_config(c.vocab)
  vocab = layout.padded_size()
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
  model = Model(m, vocab).to(dev)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
  loss_fn = torch.compile(diffusion_loss, mode=args.compile_mode)

  g = torch.Generator().manual_seed(0)
  modality = torch.randint(0, 3, (args.batch, 1), generator=g).expand(-1, args.seq_len)
  tokens = torch.zeros(args.batch, args.seq_len, dtype=torch.long)
  for i in range(3):
    lo, hi = layout.range_of(i)
    tokens = torch.where(modality == i, torch.randint(lo, hi, tokens.shape, generator=g), tokens)
  tokens, modality = tokens.to(dev), modality.contiguous().to(dev)

  def step():
    loss = loss_fn(model, tokens, modality, layout.mask)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  t0 = time.perf_counter()
  for _ in range(3):
    loss = step()
  sync()
  print(f"torch {torch.__version__} | {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'} | compile+3 steps "
        f"{time.perf_counter() - t0:.1f}s | params "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M")
  t0 = time.perf_counter()
  for _ in range(args.steps):
    loss = step()
  sync()
  dt = (time.perf_counter() - t0) / args.steps
  tok = args.batch * args.seq_len
  achieved = flops_lib.train_flops_per_token(m, vocab, args.seq_len) * tok / dt
  print(f"step {dt * 1e3:.1f} ms | {tok / dt:,.0f} tokens/s/device | {achieved / 1e12:.1f} "
        f"TFLOP/s/device | MFU {achieved / 989e12:.1%} of datasheet 989 | loss {loss.item():.3f}"
        + (f" | peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
           if dev.type == "cuda" else ""))


if __name__ == "__main__":
  main()
