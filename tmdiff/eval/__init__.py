"""tmdiff.eval: checkpoint evaluation.

  python -m tmdiff.eval --workdir=DIR            ELBO per modality + generation metrics
  python -m tmdiff.eval.judges --data_dir=DATA   train / show the judges
  python -m tmdiff.eval.sweep --workdir=DIR --modality=text|image|audio   sampler defaults

Modules: elbo (batch- and device-invariant per-modality ELBO), generation (restore, prompts,
per-sample-keyed sampling, the text / T2I / T2S tasks), judges + text_judge, image_judge,
speech_judge (models trained by our own code), sweep.
"""
