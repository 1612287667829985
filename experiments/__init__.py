"""Experiment configs. `key_values` is the one parser of their comma-separated arguments;
`data_vocab` reads a prepared data dir's vocabulary sizes (tmdiff.data.records.vocab_sizes)."""
from tmdiff.data.records import VOCAB_KEYS  # noqa: F401
from tmdiff.data.records import vocab_sizes as data_vocab  # noqa: F401


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
