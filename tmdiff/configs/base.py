"""The base config: every key the stack reads, with its default. Locked, so a typo fails.

Experiment files start from `get_base_config()` and override values; they may not add keys.
"""
from __future__ import annotations

import ml_collections as mlc


def get_base_config() -> mlc.ConfigDict:
  c = mlc.ConfigDict()
  c.seed = 0
  # Per-purpose seeds (-1: `seed`): set one to vary only that source of randomness.
  c.seeds = mlc.ConfigDict(dict(init=-1, data=-1, masks=-1, eval=-1))

  # Unified vocabulary sizes (tmdiff.data.vocab.VocabLayout).
  c.vocab = mlc.ConfigDict(dict(text_size=512, image_size=1000, audio_size=1000))

  c.model = mlc.ConfigDict(dict(
      d_model=128,
      n_layers=2,
      n_heads=4,
      n_kv_heads=4,
      head_dim=32,
      d_ff=384,               # SwiGLU hidden width
      rope_theta=10_000.0,
      norm_eps=1e-6,
      dtype="bfloat16",       # compute dtype
      param_dtype="float32",
      attention_impl="auto",  # tmdiff.kernels.attention backends
      loss_impl="auto",       # logits | fused (tmdiff.kernels.cross_entropy); auto: fused off CPU
      remat="none",           # none | block | dots (tmdiff.model.transformer.REMAT_POLICIES)
      scan_layers=False,      # blocks stacked on a "layers" axis under lax.scan (flat compile time)
      # CompleteP: shapes the hyperparameters were tuned at.
      base_width=128,
      base_depth=2,
      init_std=0.02,          # hidden-weight std at base width
      depth_alpha=1.0,        # residual branch multiplier (base_depth / depth) ** depth_alpha
  ))

  c.diffusion = mlc.ConfigDict(dict(
      # Schedule per modality: linear | cosine | polynomial | loglinear | geometric.
      schedule=mlc.ConfigDict(dict(text="linear", image="linear", audio="linear")),
      poly_exponent=2.0,
      t_min=1e-3,             # t ~ [t_min, 1]
      time_sampling="stratified",  # iid | stratified (low-discrepancy over the global batch)
      anti_masking=False,     # pair every mask with its complement (rows 2k, 2k+1)
      # Training masks keyed by step (one draw per batch) | example (by stream index: the
      # same example gets the same masks and time whatever the physical batch).
      noise_keys="step",
      # The train loss divides the batch's weighted NLL by: tokens (the ELBO tokens the batch
      # covers: each step a per-token mean) | fixed (rows x seq_len: every token weighs the same
      # whatever the batch it lands in, so the step's gradient is a mean of per-example
      # gradients, as the SDE reparameterisation assumes).
      loss_norm="tokens",
      cond_target_only_prob=0.5,   # pairs: probability of masking the target only (T2I / T2S)
      cond_drop_prob=0.1,     # pairs: probability of dropping the condition (CFG training)
  ))

  c.data = mlc.ConfigDict(dict(
      source="synthetic",     # synthetic | prepared
      data_dir="",            # prepared ArrayRecord shards (tmdiff.data.prepare)
      seq_len=128,
      global_batch=8,         # physical batch B (sequences per step)
      max_segments=8,         # documents packed into one row, at most
      # Modality mixing ratio: sampling weight of each source, by rows; with pack_pairs, the
      # share of real tokens per modality (text / image / audio; captions count as text).
      mixture=mlc.ConfigDict(dict(text=1.0, image_text=1.0, audio_text=1.0)),
      exact_mix=False,        # hold the per-step composition exact (rows per source)
      # Pack whole pairs into rows, each its own segment, beside other pairs and text; off: one
      # pair per row, padded (the paper's layout). A row holds at most max_segments segments.
      pack_pairs=False,
      worker_count=0,         # >0: Grain multiprocessing prefetch workers
      eval_batches=4,
      on_bad_record="error",  # error | skip (skipped records are counted and logged)
      log_fractions_every=0,  # log realised per-modality token fractions every N batches
  ))

  c.optim = mlc.ConfigDict(dict(
      lr=3e-3,                # base learning rate (at kappa = 1, base width/depth)
      beta1=0.9,
      beta2=0.95,
      eps=1e-8,
      weight_decay=0.0,
      clip_norm=1.0,
      schedule="cosine",      # cosine | wsd | constant
      warmup_frac=0.05,       # fractions of the token horizon
      decay_frac=0.2,         # wsd: final fraction spent decaying
      min_lr_ratio=0.1,
      ema_decay=0.0,          # 0 disables the parameter EMA
      grad_accum=1,           # microbatches per step
  ))

  # SDE batch-size reparameterisation (DESIGN.md section 1).
  c.sde = mlc.ConfigDict(dict(
      enabled=False,
      batch_base=256,         # B_base
      tokens_base=13e9,       # D_base
      gamma=0.44,
      critical_steps=0,       # S_crit; 0 = unknown, no check
  ))

  c.train = mlc.ConfigDict(dict(
      tokens=0.0,             # token horizon D; 0 = use steps
      steps=100,
      log_every=10,
      eval_every=0,           # 0 = only at the end
      ckpt_every=50,
      keep_checkpoints=3,
      async_checkpointing=True,
      # A step whose loss or gradients are not finite: error (stop at the next log or checkpoint
      # step) | skip (params and optimizer state keep their values) | rollback (restore the last
      # checkpoint, skip rollback_skip batches past it, and at least up to the bad batch).
      on_nonfinite="error",
      nonfinite_limit=10,     # stop after this many skipped steps, or rollbacks, in a row
      rollback_skip=10,
      # A damaged newest checkpoint: fallback (restore the newest intact step) | error.
      on_bad_checkpoint="fallback",
      # Multi-process runs agree on a preemption stop every this many steps (a tiny all-gather).
      preemption_check_every=10,
  ))

  c.mesh = mlc.ConfigDict(dict(
      data=-1,                # -1: all remaining devices
      fsdp=1,
      tensor=1,
      rules="fsdp",           # sharding-rule preset (tmdiff.configs.sharding)
  ))
  # Sampler defaults per generated modality (tmdiff.diffusion.sampling.SamplerSettings):
  # method ancestral | confidence | maskgit | threshold; schedule: alpha(t) name; temperature 0
  # = greedy; top_k 0 / top_p 1 = off; cfg_scale 1 = no guidance, 0 = unconditional, applied
  # while t in cfg_window; remask_eta > 0: ReMDM remasking (ancestral); block_length > 0:
  # semi-autoregressive blocks of that many masked positions, left to right, `steps` split over
  # the blocks (0 = off). Untuned starting points.
  c.sampling = mlc.ConfigDict(dict(
      text=mlc.ConfigDict(dict(
          method="ancestral", steps=64, schedule="linear", temperature=1.0, top_k=0, top_p=0.95,
          cfg_scale=1.0, cfg_window=(0.0, 1.0), confidence="sampled", choice_temperature=4.5,
          threshold=0.9, remask_eta=0.0, block_length=0)),
      image=mlc.ConfigDict(dict(
          method="ancestral", steps=64, schedule="linear", temperature=1.0, top_k=0, top_p=1.0,
          cfg_scale=2.0, cfg_window=(0.0, 1.0), confidence="sampled", choice_temperature=4.5,
          threshold=0.9, remask_eta=0.0, block_length=0)),
      audio=mlc.ConfigDict(dict(
          method="ancestral", steps=32, schedule="linear", temperature=1.0, top_k=0, top_p=1.0,
          cfg_scale=2.0, cfg_window=(0.0, 1.0), confidence="sampled", choice_temperature=4.5,
          threshold=0.9, remask_eta=0.0, block_length=0)),
  ))
  c.lock()
  return c
