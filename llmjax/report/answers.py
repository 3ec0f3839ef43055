"""The report card's fixed prompts, answered greedily by every stage of a run.

The same prompts go to an untrained model of the run's first stage's config (the random init
that stage started from, same seed), then to each language-model stage's final checkpoint in
pipeline order, so the table shows what each stage changed. The built-in prompts are
held-out items of the synthetic world: questions no stage trains on (a city, a pet, a sum)
and two word problems of GRPO's held-out split.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from llmjax.data import chat, synthetic
from llmjax.model.config import ModelConfig
from llmjax.rl.rewards import reference_match

RANDOM_INIT = "random init"


@dataclasses.dataclass(frozen=True)
class Prompt:
  text: str
  reference: str | float | None = None  # what a right answer says; None: not checked


@dataclasses.dataclass(frozen=True)
class Answer:
  model: str  # RANDOM_INIT or a stage's name
  prompt: Prompt
  text: str
  right: bool | None  # None: the prompt has no reference


def builtin_prompts() -> list[Prompt]:
  """The first held-out question about a city, a pet and a sum, and the first two held-out
  word problems (references: the answer text; the number)."""
  questions = synthetic.qa_pairs("eval")
  picked = [next(q for q in questions if q["attribute"] == kind)
            for kind in ("city", "pet", "arith")]
  problems = synthetic.reasoning_problems("eval")[:2]
  return ([Prompt(q["question"], q["answer"]) for q in picked]
          + [Prompt(p["question"], float(p["answer"])) for p in problems])


def greedy_answers(graphdef: Any, params: Any, tokenizer: Any, template: str | None,
                   prompts: Sequence[Prompt], max_new_tokens: int) -> list[str]:
  """Each prompt's greedy completion: as one user turn in `template`, or as plain text to
  continue when the run has no chat template (a pretraining-only run)."""
  from llmjax.sample.sampler import Sampler
  if template:
    ids = [chat.prompt_ids([{"role": "user", "content": p.text}], template, tokenizer)
           for p in prompts]
    sampler = Sampler(graphdef, params, tokenizer,
                      eos_ids=chat.stop_token_ids(tokenizer, template))
  else:
    ids = [tokenizer.encode(p.text, add_bos=True) for p in prompts]
    sampler = Sampler(graphdef, params, tokenizer)
  out = sampler.sample(ids, max_new_tokens=max_new_tokens)
  return [out.texts[i][0] for i in range(len(prompts))]


def checked(model: str, prompts: Sequence[Prompt], texts: Sequence[str]) -> list[Answer]:
  """Answers marked right or wrong by `reference_match` (text: exact match after
  normalising case, spaces and a final period; number: `math_answer`)."""
  return [Answer(model, p, t, None if p.reference is None
                 else bool(reference_match(t, p.reference))) for p, t in zip(prompts, texts)]


def answer_table(workdir: str, stages: Sequence[str], prompts: Sequence[Prompt], *,
                 template: str | None, random_init: tuple[ModelConfig, int] | None,
                 max_new_tokens: int = 48) -> list[Answer]:
  """Every prompt answered by the random init (`random_init`: (config, seed); None: no such
  row) and by the final checkpoint of each of `stages` (language models), in order."""
  from llmjax.runs.load import load_run
  from llmjax.train.loop import init_params
  runs = [load_run(workdir, name) for name in stages]
  if not runs:
    return []
  tokenizer = runs[0].tokenizer
  answers = []
  if random_init is not None:
    graphdef, params = init_params(*random_init)
    texts = greedy_answers(graphdef, params, tokenizer, template, prompts, max_new_tokens)
    answers += checked(RANDOM_INIT, prompts, texts)
  for run in runs:
    texts = greedy_answers(*run.float_model(), tokenizer, template, prompts, max_new_tokens)
    answers += checked(run.stage, prompts, texts)
  return answers
