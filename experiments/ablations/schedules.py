"""Ablation: noise schedules alpha(t), the same for every modality or one per modality.

  python -m tmdiff.train --config=experiments/ablations/schedules.py:cosine,size=s,data=runs/data \\
      --workdir=runs/ablations/schedules_cosine
  python -m tmdiff.scaling.sweep --sweep=experiments/sweeps/ablations.py:schedules,size=s,data=runs/data \\
      --root=runs/ablations/schedules

Argument: VARIANT[,ladder arguments] (experiments/ladder.py). Every schedule's loss is the
(reweighted) ELBO of the same model family, so the eval ELBOs compare directly; evaluation uses
each run's own schedules. Schedules: tmdiff/diffusion/schedules.py.
"""
from experiments.ablations import variant_config


def _schedules(text: str, image: str, audio: str, **extra) -> dict:
  return {"diffusion.schedule.text": text, "diffusion.schedule.image": image,
          "diffusion.schedule.audio": audio, **extra}


VARIANTS = {
    "linear": _schedules("linear", "linear", "linear"),
    "cosine": _schedules("cosine", "cosine", "cosine"),
    "polynomial": _schedules("polynomial", "polynomial", "polynomial"),
    "polynomial3": _schedules("polynomial", "polynomial", "polynomial",
                              **{"diffusion.poly_exponent": 3.0}),
    "loglinear": _schedules("loglinear", "loglinear", "loglinear"),
    "geometric": _schedules("geometric", "geometric", "geometric"),
    # Per modality: text and media differ.
    "text_linear_media_cosine": _schedules("linear", "cosine", "cosine"),
    "text_cosine_media_linear": _schedules("cosine", "linear", "linear"),
    "text_linear_image_cosine_audio_polynomial": _schedules("linear", "cosine", "polynomial"),
}
DEFAULT = "linear"


def get_config(arg: str = DEFAULT):
  return variant_config(arg, VARIANTS, DEFAULT, "experiments/ablations/schedules.py")
