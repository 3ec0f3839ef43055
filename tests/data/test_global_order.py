"""The global data order: the same global batches on any number of processes, and a data
position saved by some processes restored by another number of them (in one process here;
tests/train/test_elastic_resume.py does it across real processes)."""

import json

import grain
import numpy as np
import pytest
from etils import epath

from llmjax import checkpoint as ckpt_lib
from llmjax.data import instructions, pipeline
from llmjax.data.sources import TextSource
from llmjax.errors import CheckpointError, DataError

PRETRAIN = pipeline.DataConfig(seq_len=32, batch_size=4, eval_documents=50, eval_batches=2)
SFT = instructions.SFTDataConfig(seq_len=64, batch_size=4, builtin_train=120, builtin_eval=20,
                                 eval_batches=2)


@pytest.fixture(scope="module")
def datasets(tokenizer):
  """(make(process_index, process_count) -> this process's training batches, eval batches
  of one process) for pretraining and SFT data."""
  train_docs, eval_docs = pipeline.document_sources(PRETRAIN)
  convs = instructions.conversations(SFT)
  train_ex, eval_ex, _ = instructions.tokenize_splits(*convs, tokenizer, "chatml", SFT)
  return {
      "pretrain": (lambda p, n: pipeline.train_dataset(PRETRAIN, tokenizer, train_docs, p, n),
                   lambda p, n: pipeline.eval_batches(PRETRAIN, tokenizer, eval_docs, p, n)),
      "sft": (lambda p, n: instructions.train_batches(train_ex, SFT, p, n),
              lambda p, n: instructions.eval_batches(eval_ex, SFT, p, n)),
  }


def global_batches(iterators, steps):
  """The next `steps` global batches: each process's rows, in process order."""
  out = []
  for _ in range(steps):
    parts = [next(it) for it in iterators]
    out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
  return out


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_global_batches_are_the_same_for_any_process_count(datasets, kind):
  train, evals = datasets[kind]
  one = global_batches([iter(train(0, 1))], 3)
  assert one[0]["tokens"].shape == (4, PRETRAIN.seq_len if kind == "pretrain" else 64)
  for n in (2, 4):
    assert_same(global_batches([iter(train(p, n)) for p in range(n)], 3), one)
    per_process = [evals(p, n) for p in range(n)]
    assert_same([{k: np.concatenate([e[i][k] for e in per_process]) for k in e0}
                 for i, e0 in enumerate(per_process[0])], evals(0, 1))


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
@pytest.mark.parametrize("resumed_on", [1, 4])
def test_position_saved_by_two_processes_restores_on_another_count(datasets, tmp_path, kind,
                                                                   resumed_on):
  train, _ = datasets[kind]
  saving = [iter(train(p, 2)) for p in range(2)]
  global_batches(saving, 2)
  directory = epath.Path(tmp_path)
  for p, it in enumerate(saving):  # what DataHandler.save writes on each of 2 processes
    (directory / f"process_{p}-of-2.json").write_text(it.get_state().decode())
  expected = global_batches(saving, 2)
  resumed = [ckpt_lib.DataHandler().restore(directory, iter(train(p, resumed_on)))
             for p in range(resumed_on)]
  assert_same(global_batches(resumed, 2), expected)


def test_every_position_restores_exactly(datasets):
  # A position saved where a stream's packer holds no remainder (grain's slices (-1, -1),
  # a list after JSON) was restored as one with a remainder: the next row skipped ahead.
  train, _ = datasets["pretrain"]
  expected = global_batches([iter(train(0, 1))], 13)
  for step in range(12):
    saving = iter(train(0, 1))
    global_batches([saving], step)
    resumed = iter(train(0, 1))
    resumed.set_state(saving.get_state())  # JSON bytes, as a checkpoint holds them
    assert_same(global_batches([resumed], 1), expected[step:step + 1])


def test_each_row_stream_reads_every_bth_document(tokenizer, tmp_path):
  path = tmp_path / "d.txt"
  path.write_text("\n\n".join(f"document number {i}" for i in range(12)))
  cfg = pipeline.DataConfig(format="text", seq_len=8, batch_size=3, seed=5)
  batches = global_batches([iter(pipeline.train_dataset(cfg, tokenizer,
                                                        TextSource([str(path)])))], 40)
  # Epochs of the shuffled order (each reshuffled), as grain's shuffle defines it.
  order = grain.MapDataset.source(list(range(12))).shuffle(seed=5).repeat(None)
  order = [order[i] for i in range(12 * 8)]
  for r in range(3):
    # A row stream is one token stream cut into rows: cut it at each bos to read it back.
    stream = []
    for b in batches:
      stream += b["tokens"][r][b["segment_ids"][r] != 0].tolist()
    starts = [i for i, t in enumerate(stream) if t == tokenizer.bos_id]
    read = [int(tokenizer.decode(stream[a + 1:z]).rsplit(" ", 1)[1])
            for a, z in zip(starts, starts[1:])]
    assert len(read) > 12  # past the first epoch
    assert read == order[r::3][:len(read)], (r, read)


def test_a_position_of_another_layout_is_refused(datasets):
  train, _ = datasets["pretrain"]
  it = iter(train(0, 1))
  with pytest.raises(DataError, match="no part 'stream/0'"):
    it.set_state(json.dumps({"next_index": 3}).encode())  # a pre-streams grain state


def test_a_per_process_source_restores_only_on_its_process_count(tmp_path):
  it = iter(grain.MapDataset.source(list(range(8))).to_iter_dataset())
  directory = epath.Path(tmp_path)
  for p in range(2):
    (directory / f"process_{p}-of-2.json").write_text(json.dumps(it.get_state()))
  with pytest.raises(CheckpointError, match="data position of 2 processes, and this run has 1"):
    ckpt_lib.DataHandler().restore(directory, it)
