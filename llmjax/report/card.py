"""A run's report card: `<workdir>/report/report.md` and its plots, readable on GitHub as-is.

Sections: the same prompts answered greedily by every stage (a random init first), held-out
scores per stage (the last evaluation each stage logged, and its start's), curves, time and
speed per stage, each stage's settings, and the commands that export each stage.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from typing import Any, Callable, Sequence

from llmjax.errors import DataError
from llmjax.metrics import read_metrics
from llmjax.model.config import ModelConfig
from llmjax.report import answers as answers_lib, plots, summary

REPORT_DIR = "report"
REPORT_FILE = "report.md"


def stage_kind(stage: Any) -> str:
  """'sft' for an sft stage, also one named otherwise ('NAME/KIND' in pipeline.stages)."""
  return type(stage).name


def write_report(workdir: str, stages: Sequence[Any], prompts: Sequence[answers_lib.Prompt]
                 | None = None, max_new_tokens: int = 48, log: Callable[[str], Any] = print
                 ) -> str:
  """Writes `<workdir>/report/report.md` and its plots; returns the report's path.

  `stages`: the run's configured stages in pipeline order (`llmjax.stages.configure_stages`:
  their kinds, settings, chat template and seed). Stages with no checkpoint (a run stopped
  early) answer nothing; stages with no records are left out.
  """
  from llmjax.runs.load import has_checkpoint
  metrics_file = os.path.join(workdir, "metrics.jsonl")
  records = read_metrics(workdir) if os.path.exists(metrics_file) else []
  logged = {r["stage"] for r in records}
  if not logged & {s.name for s in stages}:
    raise DataError(f"{metrics_file} has no records of the stages {[s.name for s in stages]}: "
                    f"nothing to report yet; train first (llmjax-train --workdir={workdir})")
  stages = [s for s in stages if s.name in logged]
  prompts = list(prompts) if prompts is not None else answers_lib.builtin_prompts()
  speakers = [s for s in stages if s.model.head == "lm" and has_checkpoint(workdir, s.name)]
  template = next((s.chat_template for s in stages if getattr(s, "chat_template", None)), None)
  first = stages[0]
  table = answers_lib.answer_table(
      workdir, [s.name for s in speakers], prompts, template=template,
      random_init=(first.model, first.train.seed) if first.model.head == "lm" else None,
      max_new_tokens=max_new_tokens)
  directory = os.path.join(workdir, REPORT_DIR)
  os.makedirs(directory, exist_ok=True)
  pairs = [(s.name, stage_kind(s)) for s in stages]
  figures = plots.draw(records, pairs, directory)
  text = markdown(workdir, records, stages, table, figures, template, max_new_tokens)
  path = os.path.join(directory, REPORT_FILE)
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
  if figures is None:
    log(plots.NO_MATPLOTLIB)
  log(f"report: {path}")
  return path


def markdown(workdir: str, records: Sequence[dict[str, Any]], stages: Sequence[Any],
             table: Sequence[answers_lib.Answer], figures: Sequence[str] | None,
             template: str | None, max_new_tokens: int) -> str:
  """The report card's text; `figures` are file names beside it (None: none drawn)."""
  command = _command(workdir)
  summaries = [summary.summarize(records, s.name, stage_kind(s)) for s in stages]
  total = sum(s.seconds or 0.0 for s in summaries)
  out = [f"# Report card: {os.path.basename(os.path.abspath(workdir))}", ""]
  out.append(f"Stages {' → '.join(s.name for s in stages)}, {_minutes(total)} in all "
             "(wall clock).")
  if command:
    out += ["", "```sh", command, "```"]
  out += ["", "## The same prompts, every stage", "",
          answers_intro(template, max_new_tokens), "", *answers_markdown(table),
          "", "## Held-out scores per stage", "", *scores_markdown(summaries),
          "", "## Curves", ""]
  if figures is None:
    out.append(plots.NO_MATPLOTLIB + ".")
  else:
    out += [f"![{name[:-4]}]({name})" for name in figures]
  out += ["", "## Time and speed per stage", "", *stages_markdown(summaries, total),
          "", "## Settings of each stage", "",
          "What differs from each setting's default (the whole operative config: "
          "`config.gin` in the workdir).", ""]
  for s in stages:
    out += [f"<details><summary>{s.name} ({stage_kind(s)})</summary>", "", "```",
            *settings(s), "```", "", "</details>", ""]
  out += ["## Export", "", *export_markdown(workdir, stages)]
  return "\n".join(out).rstrip() + "\n"


def answers_intro(template: str | None, max_new_tokens: int) -> str:
  form = (f"as one user turn in the `{template}` chat template" if template
          else "as text to continue")
  return (f"Greedy answers (at most {max_new_tokens} new tokens), each prompt {form}: first an "
          "untrained model, the first stage's config initialised with its seed (the weights "
          "a first stage trained from scratch starts from), then each stage's final "
          "checkpoint. ✓ / ✗: the answer is right / wrong "
          "(text: exact match after case, spaces and a final period; numbers: the final "
          "answer, as GRPO's `math_answer` reward reads it).")


def answers_markdown(table: Sequence[answers_lib.Answer]) -> list[str]:
  """One row per (prompt, model), grouped by prompt; the prompt and its reference are written
  in the first row of its group."""
  if not table:
    return ["(no stage has a language-model checkpoint to answer with)"]
  lines = ["| prompt | model | answer | right |", "|---|---|---|---|"]
  prompts = list(dict.fromkeys(a.prompt for a in table))
  for prompt in prompts:
    for i, a in enumerate(x for x in table if x.prompt == prompt):
      head = ""
      if i == 0:
        head = f"**{_cell(prompt.text)}**"
        if prompt.reference is not None:
          head += f" ({_cell(_reference(prompt.reference))})"
      mark = "" if a.right is None else ("✓" if a.right else "✗")
      lines.append(f"| {head} | {a.model} | {_cell(_shortened(a.text)) or '(nothing)'} | "
                   f"{mark} |")
  return lines


def scores_markdown(summaries: Sequence[summary.StageSummary]) -> list[str]:
  """One row per stage, a column per held-out score any stage logged, and eval loss."""
  columns = [c for c in summary.SCORE_METRICS if any(c in s.scores for s in summaries)]
  lines = ["| stage | " + " | ".join(columns + ["eval loss"]) + " |",
           "|---|" + "---|" * (len(columns) + 1)]
  counts = []
  for s in summaries:
    cells = []
    for column in columns:
      sc = s.scores.get(column)
      cells.append("–" if sc is None else f"**{sc.value:.3f}**" + (
          f" (from {sc.start:.3f})" if sc.start is not None else ""))
      if sc is not None and sc.n:
        counts.append(f"{s.name} {column}: {sc.n}")
    cells.append("–" if s.eval_loss is None else f"{s.eval_loss:.4f}")
    lines.append(f"| {s.name} | " + " | ".join(cells) + " |")
  lines += ["", "Each cell is the stage's last evaluation; \"from\": its start model, measured "
            "before its first step. Eval loss is each stage's own objective on its held-out "
            "batches (not comparable across kinds)."]
  if counts:
    lines[-1] += " Held-out items: " + "; ".join(counts) + "."
  return lines


def stages_markdown(summaries: Sequence[summary.StageSummary], total: float) -> list[str]:
  lines = ["| stage | kind | steps | time | train tokens/s (median) | last train loss |",
           "|---|---|---|---|---|---|"]
  for s in summaries:
    lines.append(f"| {s.name} | {s.kind} | {s.steps if s.steps is not None else '–'} | "
                 f"{_minutes(s.seconds) if s.seconds is not None else '–'} | "
                 f"{f'{s.tokens_per_sec:,.0f}' if s.tokens_per_sec else '–'} | "
                 f"{f'{s.train_loss:.4f}' if s.train_loss is not None else '–'} |")
  lines.append(f"| all | | | {_minutes(total)} | | |")
  lines += ["", "Time: each stage's wall clock from its start to its last checkpoint (data, "
            "tokenizer, compiles, training, evaluations), summed over restarts."]
  return lines


def settings(obj: Any, prefix: str = "") -> list[str]:
  """`name = value` for each field of a (nested) dataclass that differs from its default;
  a model config as one line."""
  lines = []
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if isinstance(value, ModelConfig):
      lines.append(f"{prefix}{f.name} = {model_line(value)}")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
      lines += settings(value, f"{prefix}{f.name}.")
    elif value != _default(f):
      lines.append(f"{prefix}{f.name} = {value!r}")
  return lines


def model_line(cfg: ModelConfig) -> str:
  kv = f" ({cfg.n_kv_heads} KV)" if cfg.n_kv_heads != cfg.n_heads else ""
  return (f"{cfg.num_params() / 1e6:.2f}M parameters: d_model {cfg.d_model}, {cfg.n_layers} "
          f"layers, {cfg.n_heads} heads{kv}, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, head "
          f"{cfg.head}, {cfg.dtype}")


def export_markdown(workdir: str, stages: Sequence[Any]) -> list[str]:
  """The commands that write each stage as a Hugging Face folder, and chat with the last."""
  name = os.path.basename(os.path.abspath(workdir))
  run = shlex.quote(workdir)
  lines = ["```sh"]
  for s in stages:
    lines.append(f"llmjax-export --workdir={run} --stage={s.name} "
                 f"--output=exports/{name}_{s.name}")
  chat_stage = next((s for s in reversed(stages) if s.model.head == "lm"
                     and getattr(s, "chat_template", None)), None)
  if chat_stage is not None:
    lines.append(f"llmjax-generate --workdir={run} --stage={chat_stage.name} --chat")
  return lines + ["```", "", "A reward model (head `score`) exports as "
                  "`*ForSequenceClassification`, the others as `*ForCausalLM`."]


def _default(f: dataclasses.Field) -> Any:
  if f.default is not dataclasses.MISSING:
    return f.default
  if f.default_factory is not dataclasses.MISSING:
    return f.default_factory()
  return dataclasses.MISSING


def _command(workdir: str) -> str | None:
  """The command of the run's latest start, as config.gin records it."""
  path = os.path.join(workdir, "config.gin")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    for line in f:
      if line.startswith("# command: "):
        return line[len("# command: "):].strip()
  return None


def _minutes(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  return f"{m} min {s:02d} s"


def _reference(reference: str | float) -> str:
  return f"{reference:g}" if isinstance(reference, float) else reference


def _shortened(text: str, limit: int = 80) -> str:
  """An answer cut to `limit` characters (an untrained model's babble fills its budget)."""
  return text if len(text) <= limit else text[:limit].rstrip() + " …"


def _cell(text: str) -> str:
  """Text safe inside a GitHub table cell: markup characters escaped, newlines as <br>."""
  text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
  for ch in "\\`*_[]|#~":
    text = text.replace(ch, "\\" + ch)
  return "<br>".join(line.strip() for line in text.strip().splitlines())
