"""The data pipeline: packing invariants, determinism, resumption (process counts:
tests/data/test_global_order.py)."""

import numpy as np
import pytest

from llmjax.data import pipeline
from llmjax.data.sources import TextSource
from llmjax.errors import ConfigError

CFG = pipeline.DataConfig(seq_len=64, batch_size=4, eval_documents=50)


@pytest.fixture(scope="module")
def sources():
  return pipeline.document_sources(CFG)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_packed_rows_keep_documents_apart(sources, tokenizer):
  batch = next(iter(pipeline.train_dataset(CFG, tokenizer, sources[0])))
  assert set(batch) == set(pipeline.BATCH_KEYS)
  assert batch["tokens"].shape == (4, 64)
  boundaries = 0
  for r in range(4):
    tok, tgt, seg, pos = (batch[k][r] for k in ("tokens", "targets", "segment_ids", "positions"))
    for i in range(63):
      if seg[i] and seg[i] == seg[i + 1]:
        assert tgt[i] == tok[i + 1]  # next token within the document
        assert pos[i + 1] == pos[i] + 1
    starts = np.flatnonzero(pos == 0)
    for s in starts:
      if s > 0:
        assert seg[s] != seg[s - 1] or seg[s] == 0  # a new position run is a new segment
    # A document ending inside a row ends by predicting eos, never the next document's bos.
    ends = [i for i in range(63) if seg[i] and seg[i + 1] != seg[i]]
    boundaries += len(ends)
    for i in ends:
      assert tgt[i] == tokenizer.eos_id
  assert boundaries > 0


def test_document_boundaries_from_known_text(tmp_path, tokenizer):
  path = tmp_path / "docs.txt"
  path.write_text("one two three\n\nfour five\n\nsix\n")
  cfg = pipeline.DataConfig(format="text", train_paths=(str(path),), seq_len=32, batch_size=1,
                            eval_documents=0, num_epochs=1)
  source = TextSource([str(path)])
  batch = next(iter(pipeline.train_dataset(cfg, tokenizer, source)))
  seg = batch["segment_ids"][0]
  assert seg.max() == 3  # three documents, each its own segment, then padding
  assert (seg[-4:] == 0).all() and (batch["loss_mask"][0][seg == 0] == 0).all()
  for doc_id in (1, 2, 3):
    idx = np.flatnonzero(seg == doc_id)
    assert batch["tokens"][0][idx[0]] == tokenizer.bos_id
    assert batch["targets"][0][idx[-1]] == tokenizer.eos_id
    text = tokenizer.decode(batch["targets"][0][idx[:-1]].tolist())
    assert text in ("one two three", "four five", "six")


def test_deterministic_for_a_seed(sources, tokenizer):
  a = take(iter(pipeline.train_dataset(CFG, tokenizer, sources[0])), 3)
  b = take(iter(pipeline.train_dataset(CFG, tokenizer, sources[0])), 3)
  assert_batches_equal(a, b)
  other = pipeline.DataConfig(seq_len=64, batch_size=4, eval_documents=50, seed=1)
  c = take(iter(pipeline.train_dataset(other, tokenizer, sources[0])), 1)
  assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])


def test_resumes_mid_epoch_to_the_same_next_batch(sources, tokenizer):
  ds = pipeline.train_dataset(CFG, tokenizer, sources[0])
  it = iter(ds)
  take(it, 5)
  state = it.get_state()
  expected = take(it, 3)
  fresh = iter(ds)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 3), expected)


def test_epochs_reshuffle_and_cover_every_document(tokenizer, tmp_path):
  path = tmp_path / "d.txt"
  path.write_text("\n\n".join(f"document number {i}" for i in range(10)))
  cfg = pipeline.DataConfig(format="text", seq_len=8, batch_size=1, num_epochs=2)
  source = TextSource([str(path)])
  # Rows are consecutive cuts of one token stream (the last row padded), so the stream of
  # real tokens, cut at each bos, gives back the documents in the order they were read.
  stream = []
  for batch in pipeline.train_dataset(cfg, tokenizer, source):
    stream += batch["tokens"][0][batch["segment_ids"][0] != 0].tolist()
  starts = [i for i, t in enumerate(stream) if t == tokenizer.bos_id] + [len(stream)]
  assert starts[0] == 0
  texts = [tokenizer.decode(stream[a + 1:b]) for a, b in zip(starts, starts[1:])]
  assert all(t.startswith("document number ") for t in texts), texts
  order = [int(t.rsplit(" ", 1)[1]) for t in texts]
  first, second = order[:10], order[10:]
  assert sorted(first) == sorted(second) == list(range(10)), order  # each epoch: all, once
  assert first != second  # the second epoch is shuffled anew
  assert first != list(range(10))


def test_held_out_split_is_disjoint(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(f'{{"text": "doc {i}"}}' for i in range(40)))
  cfg = pipeline.DataConfig(format="jsonl", train_paths=(str(path),), eval_documents=10)
  train, held = pipeline.document_sources(cfg)
  train_docs = {train[i] for i in range(len(train))}
  eval_docs = {held[i] for i in range(len(held))}
  assert len(train_docs) == 30 and len(eval_docs) == 10 and not train_docs & eval_docs


def test_eval_batches_are_fixed_and_padded(sources, tokenizer):
  a = pipeline.eval_batches(CFG, tokenizer, sources[1])
  b = pipeline.eval_batches(CFG, tokenizer, sources[1])
  assert len(a) == CFG.eval_batches
  assert_batches_equal(a, b)


def test_seq_len_below_two_is_refused():
  with pytest.raises(ConfigError, match="seq_len must be at least 2"):
    pipeline.DataConfig(seq_len=1)


def test_too_few_documents_to_hold_out(tmp_path):
  path = tmp_path / "d.txt"
  path.write_text("a\n\nb\n\nc")
  cfg = pipeline.DataConfig(format="text", train_paths=(str(path),), eval_documents=5)
  with pytest.raises(ConfigError, match="too few to hold out"):
    pipeline.document_sources(cfg)


def test_skipped_bad_lines_are_counted_and_reported(tmp_path, caplog):
  path = tmp_path / "d.jsonl"
  lines = [f'{{"text": "doc {i}"}}' for i in range(30)]
  lines[4], lines[17] = "not json", '{"body": "no text field"}'
  path.write_text("\n".join(lines))
  cfg = pipeline.DataConfig(format="jsonl", train_paths=(str(path),), eval_documents=5,
                            skip_bad_lines=True)
  with caplog.at_level("WARNING"):
    train, held = pipeline.document_sources(cfg)
  assert len(train) + len(held) == 28
  assert "skipped 2 malformed line(s)" in caplog.text and "d.jsonl:5" in caplog.text
