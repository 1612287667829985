"""Ablation: modality mixing ratio (sampling weight of the text / image-text / audio-text sources).

  python -m tmdiff.train --config=experiments/ablations/mixing.py:text_heavy,size=s,data=runs/data \\
      --workdir=runs/ablations/mixing_text_heavy
  python -m tmdiff.scaling.sweep --sweep=experiments/sweeps/ablations.py:mixing,size=s,data=runs/data \\
      --root=runs/ablations/mixing

Argument: VARIANT[,ladder arguments] (experiments/ladder.py). At the ladder's seq 2048 pairs are
packed (data.pack_pairs) and the weights are shares of the real tokens per modality (captions
count as text), which the realised token_fraction/<modality> tracks. With
--config.data.pack_pairs=False (or seq < 256) they weigh rows instead, and the realised token
fractions differ, since a packed text row and a padded pair hold different numbers of tokens.
Compare the per-modality eval ELBOs.
"""
from experiments.ablations import variant_config


def _mix(text: float, image_text: float, audio_text: float) -> dict:
  return {"data.mixture.text": text, "data.mixture.image_text": image_text,
          "data.mixture.audio_text": audio_text}


VARIANTS = {
    "balanced": _mix(1, 1, 1),
    "text_heavy": _mix(2, 1, 1),
    "text_major": _mix(4, 1, 1),
    "image_heavy": _mix(1, 2, 1),
    "audio_heavy": _mix(1, 1, 2),
    "media_heavy": _mix(1, 2, 2),
}
DEFAULT = "balanced"


def get_config(arg: str = DEFAULT):
  return variant_config(arg, VARIANTS, DEFAULT, "experiments/ablations/mixing.py")
