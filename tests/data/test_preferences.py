"""Preference pairs: JSONL forms, errors, completion-only masks, overlong rules and the
packed pair layout (packed == padded, pairs never split, reference log-probs round-trip)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.data import chat, preferences as prefs
from llmjax.errors import ConfigError, DataError
from llmjax.model.transformer import build_model
from tests.conftest import TEST_MODEL

STANDARD = {"prompt": "Where does Alice live?", "chosen": "Paris", "rejected": "Rome"}
CONVERSATIONAL = {
    "prompt": [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "Where does Alice live?"},
               {"role": "assistant", "content": "Paris"},
               {"role": "user", "content": "And Bob?"}],
    "chosen": [{"role": "assistant", "content": "Berlin"}],
    "rejected": [{"role": "assistant", "content": "Madrid"}],
}
IMPLICIT = {
    "chosen": CONVERSATIONAL["prompt"] + CONVERSATIONAL["chosen"],
    "rejected": CONVERSATIONAL["prompt"] + CONVERSATIONAL["rejected"],
}


def _write(path, records):
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records)
                  + "\n")
  return str(path)


def _user(text):
  return {"role": "user", "content": text}


def _assistant(text):
  return {"role": "assistant", "content": text}


# ---- Sources ----

def test_jsonl_forms_normalise(tmp_path):
  same = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Hello."}
  path = _write(tmp_path / "p.jsonl", [STANDARD, "", CONVERSATIONAL, IMPLICIT, same,
                                        {"chosen": IMPLICIT["chosen"],
                                         "rejected": IMPLICIT["chosen"]}])
  pairs, stats = prefs.read_jsonl(path)
  assert stats.as_dict() == {"pairs": 3, "skipped_lines": 0, "dropped_identical": 2}
  assert pairs[0] == {"prompt": [_user("Where does Alice live?")],
                      "chosen": [_assistant("Paris")], "rejected": [_assistant("Rome")]}
  assert pairs[1] == CONVERSATIONAL
  assert pairs[2] == CONVERSATIONAL  # split at the longest common message prefix


def test_implicit_prompt_completion_may_span_turns():
  chosen = [_user("a"), _assistant("b"), _user("c"), _assistant("d")]
  rejected = [_user("a"), _assistant("x")]
  pair = prefs.normalize_pair({"chosen": chosen, "rejected": rejected}, "f:1")
  assert pair == {"prompt": [_user("a")], "chosen": chosen[1:], "rejected": rejected[1:]}


@pytest.mark.parametrize("line, message", [
    ("{not json", r"p.jsonl:2: not valid JSON"),
    ({"prompt": "x", "chosen": "y"}, r"p.jsonl:2: missing \['rejected'\]"),
    ({"prompt": "x", "chosen": 3, "rejected": "y"}, r"p.jsonl:2: 'chosen' must be a string"),
    ({"prompt": {"a": 1}, "chosen": "y", "rejected": "z"}, r"p.jsonl:2: 'prompt' must be"),
    ({"prompt": "x", "chosen": "", "rejected": "z"}, r"p.jsonl:2: empty completion in 'chosen'"),
    ({"prompt": "x", "chosen": "y", "rejected": []}, r"p.jsonl:2: 'rejected' is an empty list"),
    ({"prompt": "x", "chosen": [_user("y")], "rejected": "z"},
     r"p.jsonl:2: 'chosen' completion starts with a user message"),
    ({"prompt": "x", "chosen": [{"role": "bot", "content": "y"}], "rejected": "z"},
     r"p.jsonl:2: 'chosen'.*role 'bot'"),
    ({"chosen": "y", "rejected": "z"}, r"p.jsonl:2: with no 'prompt', 'chosen' must be a whole"),
    ({"chosen": [_user("a"), _assistant("b")], "rejected": [_user("a")]},
     r"p.jsonl:2: empty completion in 'rejected'"),
    ({"chosen": [_user("a"), _assistant("b")], "rejected": [_user("c"), _assistant("b")]},
     r"p.jsonl:2: 'chosen' completion starts with a user message"),
    ([1, 2], r"p.jsonl:2: expected a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
  path = _write(tmp_path / "p.jsonl", [STANDARD, line, STANDARD])
  with pytest.raises(DataError, match=message):
    prefs.read_jsonl(path)
  pairs, stats = prefs.read_jsonl(path, skip_bad_lines=True)
  assert len(pairs) == 2 and stats.skipped_lines == 1


def test_builtin_pairs_and_held_out_split(tmp_path):
  train, evals = prefs.builtin_pairs("train", 200), prefs.builtin_pairs("eval", 50)
  assert len(train) == 200 and len(evals) == 50
  assert all(p["chosen"] != p["rejected"] for p in train + evals)
  assert not {p["prompt"][0]["content"] for p in train} & {p["prompt"][0]["content"]
                                                          for p in evals}
  path = _write(tmp_path / "p.jsonl", [dict(STANDARD, chosen=f"c{i}") for i in range(10)])
  cfg = prefs.PreferenceDataConfig(format="jsonl", train_paths=path, eval_examples=3)
  tr, ev, _ = prefs.load_pairs(cfg)
  assert len(tr) == 7 and len(ev) == 3 and not {p["chosen"][0]["content"] for p in tr} & {
      p["chosen"][0]["content"] for p in ev}
  with pytest.raises(ConfigError, match="eval_examples=10"):
    prefs.load_pairs(cfg.__class__(format="jsonl", train_paths=path, eval_examples=10))


@pytest.mark.parametrize("kwargs, message", [
    ({"format": "parquet"}, "format='parquet'"),
    ({"overlong": "cut"}, "overlong='cut'"),
    ({"max_pairs_per_row": 0}, "max_pairs_per_row=0"),
    ({"seq_len": 4}, "seq_len >= 8"),
    ({"num_epochs": 0}, "num_epochs=0"),
])
def test_config_validation(kwargs, message):
  with pytest.raises(ConfigError, match=message):
    prefs.PreferenceDataConfig(**kwargs)


# ---- Tokenization ----

def _sequences(example):
  """The example's (chosen, rejected) sequences as (ids, targets mask): the inputs are the
  whole sequence, its last target a 0 outside the loss."""
  out = []
  for half in (1, 2):
    sel = example["half"] == half
    ids = list(example["inputs"][sel])
    assert example["targets"][sel][-1] == 0 and example["loss_mask"][sel][-1] == 0
    assert list(example["targets"][sel][:-1]) == ids[1:]
    out.append((ids, example["loss_mask"][sel]))
  return out


def test_mask_covers_only_the_completion(tokenizer):
  examples, stats = prefs.tokenize_pairs([CONVERSATIONAL], tokenizer, "chatml", 256,
                                         "truncate_prompt")
  assert stats.as_dict() == {"examples": 1, "truncated": 0, "dropped_overlong": 0,
                             "dropped_identical": 0, "dropped_empty": 0}
  ex = examples[0]
  assert ex["index"] == 0 and not ex["ref_logps"].any()
  for (ids, _), key in zip(_sequences(ex), ("chosen", "rejected")):
    # The rendered prompt + completion, exactly.
    assert ids == chat.render_chat(CONVERSATIONAL["prompt"] + CONVERSATIONAL[key], "chatml",
                                   tokenizer)[0]
  for half, reply in ((1, "Berlin"), (2, "Madrid")):
    sel = ex["half"] == half
    spans = chat.masked_spans(ex["targets"][sel], ex["loss_mask"][sel])
    # Only the completion: "Paris", the assistant turn inside the prompt, never trains.
    assert [tokenizer.decode(s) for s in spans] == [reply + "<|im_end|>"]
    assert ex["seq_positions"][sel].tolist() == list(range(sel.sum()))


def _long_pair(n_turns=6):
  prompt = []
  for i in range(n_turns):
    prompt += [_user(f"Question number {i}: what is {i} + {i}?"),
               _assistant(f"The answer is {2 * i}.")]
  prompt.append(_user("What is 7 + 7?"))
  return {"prompt": prompt, "chosen": [_assistant("The answer is 14.")],
          "rejected": [_assistant("The answer is 15, I think.")]}


def _rendered(pair, tokenizer):
  return [chat.render_chat(pair["prompt"] + pair[k], "chatml", tokenizer)[0]
          for k in ("chosen", "rejected")]


def test_overlong_rules(tokenizer):
  pair = _long_pair()
  c, r = _rendered(pair, tokenizer)
  n_prompt = len(chat.render_chat(pair["prompt"], "chatml", tokenizer)[0])
  seq_len = (len(c) + len(r)) * 2 // 3  # a third too long
  short = {"prompt": [_user("Hi?")], "chosen": [_assistant("Hello.")],
           "rejected": [_assistant("Go away.")]}

  kept, stats = prefs.tokenize_pairs([short, pair], tokenizer, "chatml", seq_len, "drop")
  assert len(kept) == 1 and stats.dropped_overlong == 1 and stats.truncated == 0

  kept, stats = prefs.tokenize_pairs([pair], tokenizer, "chatml", seq_len, "truncate_prompt")
  assert stats.truncated == 1 and len(kept[0]["inputs"]) <= seq_len
  (tc, _), (tr, _) = _sequences(kept[0])
  cut = len(c) - len(tc)
  assert cut == len(r) - len(tr) > 0  # the same prompt tokens cut from both
  assert tc == c[:1] + c[1 + cut:] and tr == r[:1] + r[1 + cut:]  # bos, then the newest part
  assert tc[0] == tokenizer.bos_id and 1 + cut < n_prompt

  # With too little room for the prompt, only bos is left and the completions' ends go.
  tiny = 2 * (len(c) - n_prompt) - 4
  kept, stats = prefs.tokenize_pairs([pair], tokenizer, "chatml", tiny, "truncate_prompt")
  assert stats.truncated == 1 and len(kept[0]["inputs"]) == tiny
  (tc, _), (tr, _) = _sequences(kept[0])
  assert tc == [tokenizer.bos_id] + c[n_prompt:len(tc) - 1 + n_prompt]
  assert tr == [tokenizer.bos_id] + r[n_prompt:len(tr) - 1 + n_prompt]

  # truncate_end keeps each sequence's beginning: here all prompt, nothing left to train on.
  _, stats = prefs.tokenize_pairs([short, pair], tokenizer, "chatml", seq_len, "truncate_end")
  assert stats.as_dict() == {"examples": 2, "truncated": 1, "dropped_overlong": 0,
                             "dropped_identical": 0, "dropped_empty": 1}
  end_len = len(c) + len(r) - 6  # cut 6 tokens: the completions' last few
  kept, stats = prefs.tokenize_pairs([pair], tokenizer, "chatml", end_len, "truncate_end")
  (tc, tm), (tr, rm) = _sequences(kept[0])
  assert stats.truncated == 1 and tc == c[:len(tc)] and tr == r[:len(tr)]
  assert len(tc) + len(tr) == end_len and tm.any() and rm.any()


def test_pairs_identical_after_truncation_are_dropped(tokenizer):
  pair = {"prompt": [_user("Say it.")], "chosen": [_assistant("Same start, then A.")],
          "rejected": [_assistant("Same start, then B.")]}
  c, r = _rendered(pair, tokenizer)
  first_diff = next(i for i, (a, b) in enumerate(zip(c, r)) if a != b)
  with pytest.raises(DataError, match="no preference pair is left"):
    prefs.tokenize_pairs([pair], tokenizer, "chatml", 2 * first_diff, "truncate_end")
  _, stats = prefs.tokenize_pairs([pair, STANDARD_PAIR], tokenizer, "chatml",
                                  2 * first_diff, "truncate_end")
  assert stats.dropped_identical == 1


STANDARD_PAIR = prefs.normalize_pair(STANDARD, "test")


# ---- Batches ----

SEQ_LEN = 192  # two or three builtin pairs (58-75 tokens) to a row


def _examples(tokenizer, n=24, seq_len=SEQ_LEN):
  pairs = prefs.builtin_pairs("train", n) + [CONVERSATIONAL]
  examples, _ = prefs.tokenize_pairs(pairs, tokenizer, "chatml", seq_len, "truncate_prompt")
  return examples


def _cfg(**kwargs):
  return prefs.PreferenceDataConfig(**{"seq_len": SEQ_LEN, "batch_size": 4, **kwargs})


def _check_layout(batch, max_pairs, rows=4, seq_len=SEQ_LEN):
  """The layout's invariants; returns {pair index: row} of the batch's pairs."""
  assert set(batch) == set(prefs.BATCH_KEYS)
  for k, v in batch.items():
    assert v.shape == ((rows, max_pairs) if k == "pair_index" else (rows, seq_len)), k
    assert v.dtype == (np.float32 if k in ("ref_logps", "margin") else np.int32), k
  where = {}
  for row in range(rows):
    slot, seg, pos = batch["pair_slot"][row], batch["segment_ids"][row], batch["positions"][row]
    pad = slot < 0
    assert not seg[pad].any() and not pos[pad].any() and not batch["loss_mask"][row][pad].any()
    assert not batch["chosen"][row][pad].any()
    for k in range(max_pairs):
      index = batch["pair_index"][row, k]
      if index < 0:
        assert not (slot == k).any()
        continue
      assert index not in where  # a pair is in one row, once
      where[int(index)] = row
      for half, is_chosen in ((1, 1), (2, 0)):
        cols = np.flatnonzero(seg == 2 * k + half)
        assert len(cols) and (slot[cols] == k).all() and (batch["chosen"][row, cols] ==
                                                          is_chosen).all()
        assert pos[cols].tolist() == list(range(len(cols)))  # contiguous, from 0
        assert batch["loss_mask"][row, cols].any()
      assert (slot == k).sum() == (seg == 2 * k + 1).sum() + (seg == 2 * k + 2).sum()
  return where


@pytest.fixture(scope="module")
def logp_fn():
  model = build_model(TEST_MODEL, seed=3)

  @jax.jit
  def token_logps(tokens, targets, positions, segment_ids):
    logits = model(tokens, positions, segment_ids)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return token_logps


def _pair_sums(examples, cfg, logp_fn):
  """{example index: (chosen logp, rejected logp, chosen length)} from one in-order pass."""
  out = {}
  for batch in prefs.pair_batches_in_order(examples, cfg):
    _check_layout(batch, cfg.max_pairs_per_row)
    logp = logp_fn(batch["tokens"], batch["targets"], batch["positions"],
                   batch["segment_ids"])
    c, r = prefs.sequence_sums(logp * batch["loss_mask"], batch, cfg.max_pairs_per_row)
    n, _ = prefs.sequence_sums(batch["loss_mask"], batch, cfg.max_pairs_per_row)
    valid = prefs.pair_valid(batch, cfg.max_pairs_per_row)
    assert (np.asarray(valid) == (batch["pair_index"] >= 0)).all()
    for row, k in zip(*np.nonzero(batch["pair_index"] >= 0)):
      out[int(batch["pair_index"][row, k])] = (float(c[row, k]), float(r[row, k]),
                                                int(n[row, k]))
  return out


def test_packed_equals_padded(tokenizer, logp_fn):
  examples = _examples(tokenizer)
  padded = _pair_sums(examples, _cfg(max_pairs_per_row=1), logp_fn)
  packed = _pair_sums(examples, _cfg(max_pairs_per_row=4), logp_fn)
  assert sorted(padded) == sorted(packed) == list(range(len(examples)))  # each once
  for i, ex in enumerate(examples):
    assert padded[i][2] == packed[i][2] == ex["loss_mask"][ex["half"] == 1].sum()
    # Attention never crosses a sequence: the same log-probs whatever shares the row.
    np.testing.assert_allclose(packed[i][:2], padded[i][:2], rtol=1e-4, atol=1e-4)
  # ... nor from the rejected sequence into the chosen one: each alone scores the same.
  for i in (0, len(examples) - 1):
    ex = examples[i]
    for half in (1, 2):
      sel = ex["half"] == half
      alone = logp_fn(ex["inputs"][None, sel], ex["targets"][None, sel],
                      ex["seq_positions"][None, sel], np.ones((1, sel.sum()), np.int32))
      np.testing.assert_allclose(float((alone * ex["loss_mask"][sel]).sum()),
                                 packed[i][half - 1], rtol=1e-4, atol=1e-4)
  rows = sum((b["pair_index"] >= 0).any(axis=1).sum()
             for b in prefs.pair_batches_in_order(examples, _cfg(max_pairs_per_row=4)))
  assert rows <= len(examples) / 2  # pairs do share rows: the comparison means something


def test_reference_logps_sum_back_exactly(tokenizer):
  examples = _examples(tokenizer, n=12)
  table = np.random.default_rng(0).normal(-30, 10, (len(examples), 2)).astype(np.float32)
  attached = prefs.attach_reference_logps(examples, table)
  assert not examples[0]["ref_logps"].any()  # the originals are unchanged
  cfg = _cfg(max_pairs_per_row=3)
  seen = 0
  for batch in prefs.pair_batches_in_order(attached, cfg):
    c, r = prefs.sequence_sums(batch["ref_logps"], batch, 3)
    ok = batch["pair_index"] >= 0
    idx = batch["pair_index"][ok]
    assert (np.asarray(c)[ok] == table[idx, 0]).all() and (np.asarray(r)[ok] ==
                                                           table[idx, 1]).all()
    seen += ok.sum()
  assert seen == len(examples)
  with pytest.raises(DataError, match=r"shape \(3, 2\)"):
    prefs.attach_reference_logps(examples, table[:3])
  with pytest.raises(DataError, match="NaN"):
    prefs.attach_reference_logps(examples, np.full_like(table, np.nan))


def test_train_and_eval_batches(tokenizer):
  examples = _examples(tokenizer)
  cfg = _cfg(max_pairs_per_row=2, batch_size=4)
  whole = iter(prefs.train_batches(examples, cfg))
  ds = prefs.train_batches(examples, cfg, process_index=1, process_count=2)
  it = iter(ds)
  for _ in range(3):
    batch, global_batch = next(it), next(whole)
    _check_layout(batch, 2, rows=2)
    # Process 1 of 2 yields the second half of the one-process global batch.
    assert all((batch[k] == global_batch[k][2:]).all() for k in batch)
  state = it.get_state()
  expected = next(it)
  it2 = iter(ds)
  it2.set_state(state)
  resumed = next(it2)
  assert all((resumed[k] == expected[k]).all() for k in expected)
  with pytest.raises(ConfigError, match="divisible"):
    prefs.train_batches(examples, _cfg(batch_size=3), process_count=2)

  evals = prefs.eval_batches(examples, _cfg(max_pairs_per_row=4, eval_batches=10))
  where = {}
  for batch in evals:
    where.update(_check_layout(batch, 4))
  assert sorted(where) == list(range(len(examples)))
  last = evals[-1]
  empty = last["pair_slot"].max(axis=1) < 0
  assert empty.any() and (last["pair_index"][empty] == -1).all()
  assert len(prefs.eval_batches(examples, _cfg(eval_batches=2))) == 2


def test_sequence_sums_ignore_padding_values():
  batch = {"pair_slot": np.array([[0, 0, 1, 1, -1]]), "chosen": np.array([[1, 0, 1, 0, 0]])}
  values = jnp.array([[1.0, 2.0, 3.0, 4.0, jnp.nan]])
  c, r = prefs.sequence_sums(values, batch, 3)
  assert c.tolist() == [[1.0, 3.0, 0.0]] and r.tolist() == [[2.0, 4.0, 0.0]]
  assert prefs.pair_valid(batch, 3).tolist() == [[True, True, False]]


def test_margin_reaches_its_pair(tokenizer, tmp_path):
  path = tmp_path / "margins.jsonl"
  lines = [{"prompt": f"Q{i}?", "chosen": f"Right {i}.", "rejected": f"Wrong {i}.",
            **({"margin": float(i) / 2} if i % 2 else {})} for i in range(6)]
  path.write_text("\n".join(json.dumps(x) for x in lines))
  pairs, _ = prefs.read_jsonl(str(path))
  examples, _ = prefs.tokenize_pairs(pairs, tokenizer, "chatml", SEQ_LEN, "truncate_prompt")
  batch = next(iter(prefs.pair_batches_in_order(examples, _cfg(max_pairs_per_row=3))))
  chosen, rejected = prefs.sequence_sums(batch["margin"], batch, 3)
  idx = batch["pair_index"]
  got = {int(i): float(c) for i, c in zip(idx[idx >= 0], np.asarray(chosen)[idx >= 0])}
  assert got == {i: (i / 2 if i % 2 else 0.0) for i in range(6)}
  assert not np.asarray(rejected).any()
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "Q?", "chosen": "a", "rejected": "b", "margin": "big"}))
  with pytest.raises(DataError, match=r"bad.jsonl:1: 'margin' must be a number"):
    prefs.read_jsonl(str(bad))
