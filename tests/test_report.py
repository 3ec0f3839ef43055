"""The report card from a run's records: the prompts table, held-out scores, time, plots.

The records are written here (no training): every number the card shows must be the one
logged. The answers of real checkpoints are tested on the SFT pipeline's run
(tests/sft/test_sft_pipeline.py).
"""

import builtins
import json
import os
import re

import pytest

from llmjax.cli import gin_flags
from llmjax.report import answers as answers_lib, card, plots
from llmjax.stages import configure_stages

PIPELINE = ["pretrain", "sft", "rm", "dpo", "grpo"]
# (stage, step, kind, metrics): what such a run logs, with numbers the card must repeat.
RECORDS = [
    ("pretrain", 0, "baseline", {"unigram_loss": 4.59}),
    ("pretrain", 10, "train", {"loss": 5.0, "tokens_per_sec": 1000.0}),
    ("pretrain", 20, "train", {"loss": 3.0, "tokens_per_sec": 3000.0}),
    ("pretrain", 20, "eval", {"loss": 2.5, "perplexity": 12.2}),
    ("pretrain", 20, "time", {"seconds": 30.0}),
    ("sft", 150, "train", {"loss": 1.5, "tokens_per_sec": 2000.0}),
    ("sft", 150, "eval", {"loss": 1.3, "exact_match": 0.5, "exact_match_n": 200}),
    ("sft", 150, "time", {"seconds": 40.0}),  # stopped at 150, then resumed:
    ("sft", 300, "train", {"loss": 1.0, "tokens_per_sec": 2200.0}),
    ("sft", 300, "eval", {"loss": 1.1, "exact_match": 0.7, "exact_match_n": 200}),
    ("sft", 300, "time", {"seconds": 50.0}),
    ("rm", 300, "train", {"loss": 0.4, "accuracy": 0.8, "margin": 2.0}),
    ("rm", 300, "eval", {"loss": 0.3, "accuracy": 0.87, "margin": 2.5}),
    ("rm", 300, "time", {"seconds": 61.0}),
    ("dpo", 0, "baseline", {"exact_match": 0.69, "exact_match_n": 200, "rejected_match": 0.01}),
    ("dpo", 200, "train", {"loss": 3.0, "rewards/margins": 4.0, "rewards/accuracies": 0.9}),
    ("dpo", 200, "eval", {"loss": 3.2, "rewards/accuracies": 0.927, "exact_match": 0.705,
                          "exact_match_n": 200}),
    ("dpo", 200, "time", {"seconds": 120.0}),
    ("grpo", 0, "baseline", {"accuracy": 0.24, "accuracy_n": 200}),
    ("grpo", 50, "train", {"loss": 0.01, "reward": 0.3, "entropy": 0.8}),
    ("grpo", 50, "eval", {"accuracy": 0.27, "accuracy_n": 200}),
    ("grpo", 200, "train", {"loss": 0.02, "reward": 0.6, "entropy": 0.5}),
    ("grpo", 200, "eval", {"accuracy": 0.53, "accuracy_n": 200}),
    ("grpo", 200, "time", {"seconds": 300.0}),
]


@pytest.fixture
def run(tmp_path):
  """(workdir with metrics.jsonl and config.gin, the configured stages of full.gin's stage
  kinds, records)."""
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  records = [{"stage": s, "step": step, "kind": kind, **m} for s, step, kind, m in RECORDS]
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  with open(os.path.join(workdir, "config.gin"), "w") as f:
    f.write("# command: llmjax-train --gin_file=experiments/tiny/full.gin --workdir=run\n")
  gin_flags.parse_gin(["experiments/tiny/full.gin"], [f"pipeline.stages = {PIPELINE}"])
  return workdir, configure_stages(), records


def table_rows(text: str, header: str) -> list[list[str]]:
  """The cells of each row of the markdown table whose header row starts with `header`."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header))
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
  return rows


def test_every_prompt_is_answered_once_by_every_model_in_order(run):
  workdir, stages, records = run
  prompts = answers_lib.builtin_prompts()
  models = [answers_lib.RANDOM_INIT, "pretrain", "sft", "dpo", "grpo"]
  # Answers with the characters a table cell must escape, and one right answer.
  table = answers_lib.checked(answers_lib.RANDOM_INIT, prompts,
                              ["a | b\n#### c"] * len(prompts))
  for m in models[1:]:
    table += answers_lib.checked(m, prompts, [_right(p) if m == "grpo" else "no" for p in prompts])
  text = card.markdown(workdir, records, stages, table, None, "chatml", 48)
  rows = table_rows(text, "| prompt | model |")
  assert all(len(r) == 4 for r in rows)  # the escaped "|" split no row
  assert len(rows) == len(prompts) * len(models)
  for i, prompt in enumerate(prompts):
    group = rows[i * len(models):(i + 1) * len(models)]
    assert prompt.text in group[0][0] and all(not r[0] for r in group[1:])
    assert [r[1] for r in group] == models
    assert [r[3] for r in group] == ["✗"] * 4 + ["✓"]
  assert "a \\| b<br>\\#\\#\\#\\# c" in rows[0][2]


def _right(prompt: answers_lib.Prompt) -> str:
  return (f"{prompt.reference:g}" if isinstance(prompt.reference, float)
          else prompt.reference)


def test_scores_and_times_are_the_logged_ones(run):
  workdir, stages, records = run
  text = card.markdown(workdir, records, stages, [], None, "chatml", 48)
  scores = {r[0]: r[1:] for r in table_rows(text, "| stage | exact match")}
  assert "| stage | exact match | preference accuracy | reasoning accuracy | eval loss |" in text
  assert scores["pretrain"] == ["–", "–", "–", "2.5000"]
  assert scores["sft"] == ["**0.700**", "–", "–", "1.1000"]  # the last eval, not the first
  # rm's `accuracy` is pairwise preference accuracy, grpo's the word problems' accuracy.
  assert scores["rm"] == ["–", "**0.870**", "–", "0.3000"]
  assert scores["dpo"] == ["**0.705** (from 0.690)", "**0.927**", "–", "3.2000"]
  assert scores["grpo"] == ["–", "–", "**0.530** (from 0.240)", "–"]
  times = {r[0]: r for r in table_rows(text, "| stage | kind | steps | time")}
  assert times["sft"][1:4] == ["sft", "300", "1 min 30 s"]  # both starts of the stage
  assert times["pretrain"][4] == "2,000"  # the median of its train records' tokens/s
  assert times["all"][3] == "10 min 01 s"
  assert "llmjax-train --gin_file=experiments/tiny/full.gin --workdir=run" in text
  assert "llmjax-export --workdir=" in text and "--stage=rm" in text


def test_plots_are_drawn_beside_the_report_and_linked_relatively(run):
  pytest.importorskip("matplotlib")
  workdir, stages, _ = run
  path = card.write_report(workdir, stages, log=lambda _: None)
  text = open(path).read()
  linked = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
  assert linked == [plots.LOSS_FILE, plots.RL_FILE, plots.SPEED_FILE]
  for name in linked:
    assert os.path.getsize(os.path.join(os.path.dirname(path), name)) > 1000
  assert plots.NO_MATPLOTLIB not in text


def test_without_matplotlib_the_report_says_how_to_get_the_plots(run, monkeypatch):
  workdir, stages, _ = run
  real_import = builtins.__import__

  def no_matplotlib(name, *args, **kwargs):
    if name.split(".")[0] == "matplotlib":
      raise ImportError("No module named 'matplotlib'")
    return real_import(name, *args, **kwargs)
  monkeypatch.setattr(builtins, "__import__", no_matplotlib)
  logged = []
  path = card.write_report(workdir, stages, log=logged.append)
  text = open(path).read()
  assert plots.NO_MATPLOTLIB in text and plots.NO_MATPLOTLIB in logged
  assert "pip install 'llmjax[plot]'" in text
  assert not [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".png")]
  assert "**0.530** (from 0.240)" in text  # the tables all the same


def test_a_run_with_nothing_logged_yet_is_a_clear_error(run):
  from llmjax.errors import DataError
  workdir, stages, _ = run
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  with pytest.raises(DataError, match="nothing to report yet; train first"):
    card.write_report(workdir, stages, log=lambda _: None)
