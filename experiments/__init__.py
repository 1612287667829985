"""Experiment configs. `key_values` is the one parser of their comma-separated arguments;
`data_vocab` reads a prepared data dir's vocabulary sizes."""
import os

VOCAB_KEYS = ("text_size", "image_size", "audio_size")


def key_values(arg: str, keys: tuple, where: str) -> dict:
  """'k1=v1,k2=v2' -> {k1: v1, k2: v2}; a key outside `keys` or an item without '=' is an error
  that names `where` (the experiment file)."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in keys:
      raise ValueError(f"{where}: bad argument {item!r}; keys are {keys} "
                       "as key=value, comma-separated")
    out[key] = value
  return out


def data_vocab(data_dir: str) -> dict | None:
  """{text_size, image_size, audio_size} from the manifest of a prepared dir; None where the
  dir holds no manifest yet (the config is then built before `prepare` has run)."""
  from tmdiff.data import records
  if not os.path.exists(os.path.join(data_dir, records.MANIFEST)):
    return None
  vocab = records.Manifest.load(data_dir).vocab
  return {k: int(vocab[k]) for k in VOCAB_KEYS}
