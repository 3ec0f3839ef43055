"""Prompt data for RL: sources and their errors, reference numbers, tokenization (overlong
rules, assistant header last), the iterator's exact resume and per-process disjointness;
and the word-problem conversations SFT mixes in."""

import json
import logging as py_logging

import pytest

from llmjax.data import chat, instructions, prompts, synthetic
from llmjax.errors import ConfigError, DataError


def _write(path, records):
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records)
                  + "\n")
  return str(path)


def _cfg(**kwargs):
  return prompts.PromptDataConfig(**kwargs)


# ---- Reference numbers ----

@pytest.mark.parametrize("text,expected", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", 72.0),
    ("#### 1,200", 1200.0),
    ("#### -3", -3.0),
    ("####2.5", 2.5),
    ("42", 42.0),
    (" 1,000,000. ", 1e6),
    ("$15", 15.0),
    ("-0.5", -0.5),
    ("about 7", None),
    ("#### seven", None),
    ("7 + 5", None),
    ("", None),
])
def test_reference_number(text, expected):
  assert prompts._reference_number(text) == expected


# ---- Sources ----

def test_gsm8k_lines(tmp_path):
  path = _write(tmp_path / "gsm8k.jsonl", [
      {"question": "How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
      "",
      {"question": "How much?", "answer": "It costs 1,200.\n#### 1,200"},
  ])
  items, stats = prompts.read_jsonl(path, "gsm8k")
  assert [i["answer"] for i in items] == [7.0, 1200.0]
  assert items[0]["messages"] == [{"role": "user", "content": "How many?"}]
  assert items[1]["question"] == "How much?"
  assert stats == prompts.PromptStats()


def test_generic_lines(tmp_path):
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
              {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
  path = _write(tmp_path / "p.jsonl", [
      {"prompt": "What is 2 + 2?", "answer": 4},
      {"prompt": messages, "answer": "#### 1,000"},
      {"prompt": "Half of 5?", "answer": "2.5"},
      {"prompt": "Minus?", "answer": -3.0},
  ])
  items, _ = prompts.read_jsonl(path, "jsonl")
  assert [i["answer"] for i in items] == [4.0, 1000.0, 2.5, -3.0]
  assert items[1]["messages"] == messages and items[1]["question"] == "Q2"


@pytest.mark.parametrize("fmt,line,message", [
    ("gsm8k", "{not json", "not valid JSON"),
    ("gsm8k", "[1, 2]", "expected a JSON object"),
    ("gsm8k", {"question": "Q"}, "'answer' is missing"),
    ("gsm8k", {"question": 3, "answer": "#### 3"}, "'question' is int"),
    ("jsonl", {"prompt": "Q"}, r"missing \['answer'\]"),
    ("jsonl", {"prompt": 5, "answer": 1}, "'prompt' must be a string or a list"),
    ("jsonl", {"prompt": [], "answer": 1}, "non-empty list"),
    ("jsonl", {"prompt": [{"role": "user", "content": "Q"},
                          {"role": "assistant", "content": "A"}], "answer": 1},
     "ends with a assistant message"),
    ("jsonl", {"prompt": [{"role": "robot", "content": "Q"}], "answer": 1}, "role 'robot'"),
    ("jsonl", {"prompt": "Q", "answer": True}, "'answer' must be a string or a number"),
    ("jsonl", {"prompt": "Q", "answer": [1]}, "'answer' must be a string or a number"),
])
def test_bad_lines_name_file_and_line(tmp_path, fmt, line, message):
  good = ({"question": "Q", "answer": "#### 1"} if fmt == "gsm8k"
          else {"prompt": "Q", "answer": 1})
  path = _write(tmp_path / "bad.jsonl", [good, line, good])
  with pytest.raises(DataError, match=f"bad.jsonl:2: .*{message}"):
    prompts.read_jsonl(path, fmt)
  items, stats = prompts.read_jsonl(path, fmt, skip_bad_lines=True)
  assert len(items) == 2 and stats.skipped_lines == 1


def test_unparsable_answers_are_counted_and_named(tmp_path, caplog):
  path = _write(tmp_path / "g.jsonl", [
      {"question": "Q1", "answer": "no marker 5"},
      {"question": "Q2", "answer": "#### 5"},
      {"question": "Q3", "answer": "#### five"},
  ])
  with caplog.at_level(py_logging.WARNING):
    items, stats = prompts.read_jsonl(path, "gsm8k")
  assert len(items) == 1 and stats.unparsable_answers == 2
  assert "g.jsonl:1" in caplog.text and "g.jsonl:3" in caplog.text
  all_bad = _write(tmp_path / "all_bad.jsonl", [{"prompt": "Q", "answer": "x"},
                                                {"prompt": "Q", "answer": float("nan")}])
  with pytest.raises(DataError, match="all_bad.jsonl:1, .*all_bad.jsonl:2"):
    prompts.read_jsonl(all_bad, "jsonl")


def test_missing_and_empty_files(tmp_path):
  with pytest.raises(DataError, match="nope.jsonl: no such file"):
    prompts.read_jsonl(str(tmp_path / "nope.jsonl"), "jsonl")
  with pytest.raises(DataError, match="matches no files"):
    prompts.read_jsonl(str(tmp_path / "*.jsonl"), "jsonl")
  empty = _write(tmp_path / "empty.jsonl", [""])
  with pytest.raises(DataError, match="no prompts found"):
    prompts.read_jsonl(empty, "jsonl")


def test_load_prompts_holds_out_a_fixed_selection(tmp_path):
  path = _write(tmp_path / "p.jsonl", [{"prompt": f"Q{i}", "answer": i} for i in range(30)])
  train, evals, _ = prompts.load_prompts(_cfg(format="jsonl", train_paths=path,
                                              eval_examples=5))
  assert len(train) == 25 and len(evals) == 5
  assert not {p["question"] for p in train} & {p["question"] for p in evals}
  _, evals2, _ = prompts.load_prompts(_cfg(format="jsonl", train_paths=path, eval_examples=5,
                                           seed=7))
  assert evals2 == evals  # the shuffle seed never moves the held-out set
  _, given, _ = prompts.load_prompts(_cfg(format="jsonl", train_paths=path, eval_paths=path))
  assert len(given) == 30
  with pytest.raises(ConfigError, match="too few to hold out"):
    prompts.load_prompts(_cfg(format="jsonl", train_paths=path, eval_examples=30))


def test_builtin_prompts_are_held_out():
  train, evals, stats = prompts.load_prompts(_cfg(builtin_train=500, builtin_eval=100))
  assert (len(train), len(evals)) == (500, 100)
  assert not {p["question"] for p in train} & {p["question"] for p in evals}
  problems = synthetic.reasoning_problems("train", 500)
  assert [p["answer"] for p in train] == [float(p["answer"]) for p in problems]
  assert stats == prompts.PromptStats()


@pytest.mark.parametrize("kwargs,message", [
    ({"format": "csv"}, "format='csv'"),
    ({"overlong": "truncate_end"}, "overlong='truncate_end'"),
    ({"max_prompt_tokens": 4}, "max_prompt_tokens=4"),
    ({"prompts_per_step": 0}, "prompts_per_step=0"),
    ({"eval_prompts": 0}, "eval_prompts=0"),
    ({"num_epochs": 0}, "num_epochs=0"),
    ({"system_prompt": 3}, "system_prompt must be a string"),
    ({"format": "gsm8k"}, "train_paths is empty"),
])
def test_config_validation(kwargs, message):
  with pytest.raises(ConfigError, match=message):
    _cfg(**kwargs)


def test_paths_accept_a_bare_string():
  assert _cfg(format="jsonl", train_paths="a.jsonl").train_paths == ("a.jsonl",)


# ---- Tokenization ----

@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_prompts_end_with_the_assistant_header(tokenizer, template):
  items = prompts.builtin_items("train", 20)
  cfg = _cfg(system_prompt="Solve it. End with #### and the answer.")
  examples, stats = prompts.tokenize_prompts(items, tokenizer, template, cfg)
  assert stats == prompts.PromptStats(examples=20)
  header = chat.render_text([], template, add_generation_prompt=True)
  for ex, item in zip(examples, items):
    messages = [{"role": "system", "content": cfg.system_prompt}] + item["messages"]
    assert ex["prompt_ids"] == chat.prompt_ids(messages, template, tokenizer)
    assert tokenizer.decode(ex["prompt_ids"]).endswith(header)
    assert ex["question"] == item["question"] and ex["answer"] == item["answer"]
  assert [ex["index"] for ex in examples] == list(range(20))


def test_own_system_message_wins(tokenizer):
  own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Q"}]
  assert prompts.with_system_prompt(own, "Default.") == own
  assert prompts.with_system_prompt(own[1:], "Default.")[0]["content"] == "Default."
  assert prompts.with_system_prompt(own[1:], None) == own[1:]


def test_overlong_truncate_and_drop(tokenizer):
  long_q = "Alice has 3 cats. " * 30 + "How many cats does Alice have?"
  items = [{"messages": [{"role": "user", "content": q}], "question": q, "answer": 1.0}
           for q in ("What is 2 + 2?", long_q)]
  system = "Answer with #### N."
  cfg = _cfg(max_prompt_tokens=64, system_prompt=system)
  examples, stats = prompts.tokenize_prompts(items, tokenizer, "chatml", cfg)
  assert (stats.truncated, stats.dropped_overlong, len(examples)) == (1, 0, 2)
  short, cut = examples[0]["prompt_ids"], examples[1]["prompt_ids"]
  full = chat.prompt_ids(prompts.with_system_prompt(items[1]["messages"], system), "chatml",
                         tokenizer)
  lead = chat.render_chat([{"role": "system", "content": system}], "chatml", tokenizer)[0]
  assert len(cut) == 64 and cut[:len(lead)] == lead and lead[0] == tokenizer.bos_id
  assert cut[len(lead):] == full[len(full) - (64 - len(lead)):]  # the question's end is kept
  assert tokenizer.decode(cut).endswith("How many cats does Alice have?<|im_end|>\n"
                                        "<|im_start|>assistant\n")
  assert len(short) < 64
  dropped, stats = prompts.tokenize_prompts(items, tokenizer, "chatml",
                                            _cfg(max_prompt_tokens=64, overlong="drop"))
  assert (stats.truncated, stats.dropped_overlong, len(dropped)) == (0, 1, 1)
  assert dropped[0]["index"] == 0
  with pytest.raises(DataError, match="no prompt is left"):
    prompts.tokenize_prompts(items[1:], tokenizer, "chatml",
                             _cfg(max_prompt_tokens=64, overlong="drop"))


def test_a_long_system_prompt_is_cut_too(tokenizer):
  system = "Think step by step. " * 20
  items = [{"messages": [{"role": "user", "content": "What is 2 + 2?"}],
            "question": "What is 2 + 2?", "answer": 4.0}]
  cfg = _cfg(max_prompt_tokens=32, system_prompt=system)
  (ex,), stats = prompts.tokenize_prompts(items, tokenizer, "chatml", cfg)
  assert stats.truncated == 1 and len(ex["prompt_ids"]) == 32
  assert ex["prompt_ids"][0] == tokenizer.bos_id
  assert tokenizer.decode(ex["prompt_ids"]).endswith("What is 2 + 2?<|im_end|>\n"
                                                     "<|im_start|>assistant\n")


def test_prompt_data_adds_up_stats(tokenizer):
  cfg = _cfg(builtin_train=40, builtin_eval=10, max_prompt_tokens=76, overlong="drop")
  train, evals, stats = prompts.prompt_data(cfg, tokenizer, "chatml")
  assert stats.examples == 50
  assert len(train) + len(evals) + stats.dropped_overlong == 50
  assert 0 < stats.dropped_overlong < 50
  assert all(len(ex["prompt_ids"]) <= 76 for ex in train + evals)


# ---- Serving ----

def _examples(n):
  return [{"index": i, "prompt_ids": [2, i], "answer": float(i), "question": f"Q{i}"}
          for i in range(n)]


def _indices(group):
  return [ex["index"] for ex in group]


@pytest.mark.parametrize("k", [0, 3, 7])
def test_iterator_resumes_exactly(k):
  examples, cfg = _examples(10), _cfg(prompts_per_step=4, seed=3)
  it = prompts.PromptIterator(examples, cfg)
  for _ in range(k):
    next(it)
  state = it.get_state()
  assert isinstance(state, bytes)
  expected = [_indices(next(it)) for _ in range(6)]
  fresh = prompts.PromptIterator(examples, cfg)
  fresh.set_state(state)
  assert [_indices(next(fresh)) for _ in range(6)] == expected


def test_iterator_epochs_shuffle_and_end():
  examples = _examples(8)
  groups = [_indices(g) for g in prompts.PromptIterator(examples, _cfg(prompts_per_step=4,
                                                                       num_epochs=2))]
  assert len(groups) == 4
  first, second = sorted(groups[0] + groups[1]), sorted(groups[2] + groups[3])
  assert first == second == list(range(8))  # every prompt once per epoch
  assert groups[:2] != groups[2:]  # reshuffled
  assert groups[0] != [0, 1, 2, 3]
  other = [_indices(g) for g in prompts.PromptIterator(examples, _cfg(
      prompts_per_step=4, num_epochs=2, seed=1))]
  assert other != groups
  # The groups keep python objects: prompts of different lengths stay lists.
  assert next(prompts.PromptIterator(examples, _cfg(prompts_per_step=2)))[0]["prompt_ids"] \
      in [ex["prompt_ids"] for ex in examples]


def test_iterator_processes_are_disjoint():
  examples, cfg = _examples(12), _cfg(prompts_per_step=6, num_epochs=1)
  shards = []
  for pid in range(3):
    groups = list(prompts.PromptIterator(examples, cfg, pid, 3))
    assert all(len(g) == 2 for g in groups) and len(groups) == 2
    shards.append({i for g in groups for i in _indices(g)})
  assert sorted(i for s in shards for i in s) == list(range(12))
  with pytest.raises(ConfigError, match="divisible by the number of processes"):
    prompts.PromptIterator(examples, cfg, 0, 4)
  with pytest.raises(DataError, match="too few"):
    prompts.PromptIterator(_examples(1), _cfg(prompts_per_step=2), 1, 2)


def test_iterator_bad_state():
  it = prompts.PromptIterator(_examples(4), _cfg(prompts_per_step=2))
  with pytest.raises(DataError, match="does not fit"):
    it.set_state(b"not json")


def test_eval_prompts_fixed_and_split():
  examples, cfg = _examples(11), _cfg(eval_prompts=8)
  assert _indices(prompts.eval_prompts(examples, cfg)) == list(range(8))
  shares = [_indices(prompts.eval_prompts(examples, cfg, p, 3)) for p in range(3)]
  assert shares == [[0, 3], [1, 4], [2, 5]]  # 8 rounded down to 6: equal shares
  assert len(prompts.eval_prompts(examples, _cfg(eval_prompts=100))) == 11
  with pytest.raises(ConfigError, match="too few"):
    prompts.eval_prompts(examples[:1], cfg, 0, 2)


# ---- SFT: word problems teach the answer format ----

def test_reasoning_conversations_and_sft_mix():
  convs = instructions.reasoning_conversations("train", 5)
  problems = synthetic.reasoning_problems("train", 5)
  assert convs == [[{"role": "user", "content": p["question"]},
                    {"role": "assistant", "content": p["solution"]}] for p in problems]
  base = instructions.SFTDataConfig(builtin_train=50, builtin_eval=20)
  train, evals, _ = instructions.conversations(base)
  mixed_cfg = instructions.SFTDataConfig(builtin_train=50, builtin_eval=20,
                                         builtin_reasoning=30)
  mixed, mixed_evals, _ = instructions.conversations(mixed_cfg)
  assert mixed[:len(train)] == train and len(mixed) == len(train) + 30
  assert mixed_evals == evals
  assert all(c[-1]["content"].endswith(f"#### {p['answer']}") for c, p in zip(
      mixed[len(train):], synthetic.reasoning_problems("train", 30)))
  with pytest.raises(ConfigError, match="builtin_reasoning"):
    instructions.SFTDataConfig(format="jsonl", train_paths="a.jsonl", builtin_reasoning=5)
  with pytest.raises(ConfigError, match="builtin_reasoning"):
    instructions.SFTDataConfig(builtin_reasoning=-1)
