"""seqio bridge: our text as seqio Tasks and a seqio Task as our text source.

Skipped unless the `seqio` extra is installed (CI installs it: launch/setup_env.sh).
"""
import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")

from tmdiff.configs.base import get_base_config  # noqa: E402
from tmdiff.data import pipeline, prepare, records, seqio_bridge  # noqa: E402
from tmdiff.data import vocab as vocab_lib  # noqa: E402
from tmdiff.data.tokenizers import text as text_tok  # noqa: E402

# Strings a tokenizer can get wrong: accents, U+2581 (SentencePiece's space mark), emoji,
# newlines, runs of spaces.
TOY = ["Now is the winter of our discontent.", "caf\u00e9 \u2581 na\u00efve \U0001F600",
       "line one\nline two\n\n  indented", "x" * 300, "To be, or not to be: that is the question."]


@pytest.fixture(scope="module")
def prepared_text(tmp_path_factory):
  """Embedded Shakespeare, 40 documents, a 400-id SentencePiece tokenizer."""
  out = tmp_path_factory.mktemp("prepared_text")
  prepare.prepare(prepare.parse_args([f"--out={out}", "--sources=text", "--max_text_docs=40",
                                      "--text_vocab_size=400", "--shard_records=16"]))
  return str(out)


@pytest.fixture(scope="module")
def toy_task():
  def dataset_fn(split, shuffle_files, seed=None):
    texts = TOY if split == "train" else TOY[:2]
    return tf.data.Dataset.from_tensor_slices({"body": texts, "n": list(range(len(texts)))})
  name = "tmdiff_test_toy"
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(dataset_fn,
                                                               splits=["train", "validation"]),
                         output_features={"body": seqio.Feature(seqio.PassThroughVocabulary(1))})
  return name


def _config(data_dir):
  c = get_base_config()
  c.data.source, c.data.data_dir = "prepared", data_dir
  for k, v in records.Manifest.load(data_dir).vocab.items():
    c.vocab[k] = int(v)
  c.data.mixture.image_text = c.data.mixture.audio_text = 0.0
  c.data.seq_len, c.data.global_batch = 64, 4
  return c


def _pipeline_documents(data_dir, n_docs):
  """The first n_docs validation documents as the pipeline packs them, in local text ids."""
  c = _config(data_dir)
  layout = vocab_lib.VocabLayout.from_config(c.vocab)
  it = iter(pipeline.make_dataset(c, "validation"))
  stream = []
  while stream.count(layout.eos) < n_docs:
    batch = next(it)
    stream += [t for row in batch["tokens"] for t in row[row != layout.pad].tolist()]
  docs, current = [], None
  for t in stream:
    if t == layout.bos:
      current = []
    elif t == layout.eos:
      docs.append(np.asarray(current))
    else:
      current.append(t)
  return [layout.to_local(d, vocab_lib.TEXT) for d in docs[:n_docs]]


def test_prepared_text_as_a_seqio_task_gives_the_pipelines_token_ids(prepared_text):
  names = seqio_bridge.register_tasks(prepared_text)
  assert names == ["tmdiff_text", "tmdiff_shakespeare"]
  task = seqio.get_mixture_or_task("tmdiff_text")
  got = [ex["text"] for ex in task.get_dataset(sequence_length=None, split="validation",
                                               shuffle=False).as_numpy_iterator()]
  want = _pipeline_documents(prepared_text, len(got))
  assert len(got) == records.Manifest.load(prepared_text).counts["text"]["validation"] > 0
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def test_shakespeare_task_tokenised_by_seqio_matches_the_prepared_records(prepared_text):
  seqio_bridge.register_tasks(prepared_text)
  records_by_id = {ex["id"].decode(): ex["text"] for ex in seqio.get_mixture_or_task(
      "tmdiff_text").get_dataset(sequence_length=None, split="train",
                                 shuffle=False).as_numpy_iterator()}
  raw = seqio.get_mixture_or_task("tmdiff_shakespeare").get_dataset(
      sequence_length=None, split="train", shuffle=False)
  matched = 0
  for ex in raw.as_numpy_iterator():
    doc_id = ex["id"].decode()
    if doc_id in records_by_id:   # prepare kept the first 40 documents
      np.testing.assert_array_equal(ex["text"], records_by_id[doc_id])
      matched += 1
  assert matched == len(records_by_id) == 40


def test_text_vocabulary_round_trips_in_python_and_tensorflow(prepared_text):
  vocab = seqio_bridge.text_vocabulary(f"{prepared_text}/tokenizers/text")
  ours = text_tok.TextTokenizer.load(f"{prepared_text}/tokenizers/text")
  assert vocab.vocab_size == ours.vocab_size and vocab.eos_id is None
  for s in TOY:
    ids = vocab.encode(s)
    assert ids == ours.encode(s).tolist() and vocab.decode(ids) == s
    tf_ids = vocab.encode_tf(tf.constant(s))
    np.testing.assert_array_equal(tf_ids.numpy(), ids)
    assert vocab.decode_tf(tf_ids).numpy().decode() == s
  # A padded batch (seqio pads with 0): each row decodes to its string.
  rows = [vocab.encode(s) for s in TOY[:3]]
  width = max(map(len, rows))
  batch = tf.constant([r + [vocab.pad_id] * (width - len(r)) for r in rows], tf.int32)
  assert [t.decode() for t in vocab.decode_tf(batch).numpy()] == TOY[:3]


def test_seqio_task_as_our_text_source_decodes_to_the_input(prepared_text, toy_task, tmp_path):
  spec = f"seqio:{toy_task}?feature=body"
  docs = seqio_bridge.task_documents(spec, "train")
  assert [d["text"] for d in docs] == TOY
  # Through prepare (reusing the trained tokenizer) into text records, then decoded.
  out = tmp_path / "from_seqio"
  manifest = prepare.prepare(prepare.parse_args(
      [f"--out={out}", "--sources=text", f"--text_files={spec}",
       f"--tokenizers={prepared_text}/tokenizers"]))
  tok = text_tok.TextTokenizer.load(f"{prepared_text}/tokenizers/text")
  for split, want in (("train", TOY), ("validation", TOY[:2])):
    reader = records.ShardReader(manifest.shard_paths(str(out), "text", split))
    decoded = sorted(tok.decode(reader[i][0]["text"]) for i in range(len(reader)))
    assert decoded == sorted(want)


def test_task_without_validation_split_holds_out_a_stable_share(toy_task):
  name = "tmdiff_test_train_only"
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  texts = [f"document number {i}" for i in range(200)]
  seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(
      lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices({"text": texts}),
      splits=["train"]), output_features={"text": seqio.Feature(seqio.PassThroughVocabulary(1))})
  train = seqio_bridge.task_documents(f"seqio:{name}", "train", validation_fraction=0.1)
  val = seqio_bridge.task_documents(f"seqio:{name}", "validation", validation_fraction=0.1)
  assert sorted(d["text"] for d in train + val) == sorted(texts)
  assert 5 <= len(val) <= 40 and not {d["id"] for d in train} & {d["id"] for d in val}


def test_errors_name_the_task_feature_and_spec(toy_task):
  with pytest.raises(seqio_bridge.BridgeError, match="no seqio task 'nope'"):
    seqio_bridge.task_documents("seqio:nope", "train")
  with pytest.raises(seqio_bridge.BridgeError, match="no feature 'text'.*'body'"):
    seqio_bridge.task_documents(f"seqio:{toy_task}", "train")
  with pytest.raises(seqio_bridge.BridgeError, match="feature 'n' is not a string"):
    seqio_bridge.task_documents(f"seqio:{toy_task}?feature=n", "train")
  with pytest.raises(seqio_bridge.BridgeError, match="options only feature= and module="):
    seqio_bridge.parse_spec(f"seqio:{toy_task}?colour=red")
  with pytest.raises(ModuleNotFoundError, match="no_such_module"):
    seqio_bridge.task_documents(f"seqio:{toy_task}?module=no_such_module", "train")
