"""On-policy preference pairs: a policy's own answers, labelled right or wrong by a reference.

A reward model trained only on made-up pairs (the true answer over a hand-written wrong one)
has never seen the answers a policy actually gives, and PPO finds wrong answers it scores
above right ones (README, "RLHF: PPO"). Trained also on the policy's own samples, K per
question at temperature ~1 and each labelled by `rewards.reference_match` against the
question's reference answer, it learns to rank exactly the mistakes PPO's policy starts from:
for every distinct wrong sample of a question, a correct sample of the same question is
chosen over it (the reference answer itself when no sample was right).

The pairs are a deterministic function of the sampling model's parameters, the questions and
the seed (`Sampler.sample` is), so a resumed stage rebuilds the very pairs it trained on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import gin

from llmjax.data import chat
from llmjax.errors import ConfigError
from llmjax.rl.rewards import reference_match
from llmjax.sample.sampler import Sampler

Messages = list[dict[str, str]]
Pair = dict[str, Messages]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OnPolicyPairs:
  """Pairs sampled from the stage's starting policy (`rm.on_policy = @OnPolicyPairs()`).

  Attributes:
    samples: completions sampled per training question (K).
    temperature: their sampling temperature (1.0: the policy's own distribution, as PPO's
      rollouts sample it).
    max_new_tokens: each completion's budget; one that hits it unfinished counts as wrong
      (unless its text is the answer).
    eval_questions: held-out questions whose own sampled pairs are evaluated beside the
      held-out pairs (`on_policy/accuracy`); 0: none.
    seed: the sampling seed.
  """
  samples: int = 4
  temperature: float = 1.0
  max_new_tokens: int = 24
  eval_questions: int = 200
  seed: int = 0

  def __post_init__(self):
    if self.samples < 1:
      raise ConfigError(f"OnPolicyPairs.samples={self.samples}: use 1 or more completions "
                        "per question (4 is usual)")
    if self.temperature <= 0 or self.max_new_tokens < 1 or self.eval_questions < 0:
      raise ConfigError(f"OnPolicyPairs needs temperature > 0 (sampled, not greedy), "
                        f"max_new_tokens >= 1 and eval_questions >= 0; got "
                        f"{self.temperature}, {self.max_new_tokens}, {self.eval_questions}")


def pairs_from_samples(prompt: Messages, samples: Sequence[str], correct: Sequence[bool],
                       reference: str) -> list[Pair]:
  """One question's pairs: every distinct wrong sample rejected, in order, each against the
  next distinct correct sample in turn (the `reference` answer when no sample is correct).

  Args:
    prompt: the question's messages.
    samples: the sampled completions' texts, `[K]`.
    correct: whether each sample gives the reference answer, `[K]`.
    reference: the reference answer's text.
  Returns:
    `{prompt, chosen, rejected}` pairs (`llmjax.data.preferences`), one per distinct wrong
    sample; none when every sample is right.
  """
  if len(samples) != len(correct):
    raise ValueError(f"{len(samples)} samples but {len(correct)} correctness labels")
  right = list(dict.fromkeys(s for s, ok in zip(samples, correct) if ok)) or [reference]
  wrong = list(dict.fromkeys(s for s, ok in zip(samples, correct) if not ok))
  reply = lambda text: [{"role": "assistant", "content": text}]
  return [{"prompt": list(prompt), "chosen": reply(right[i % len(right)]),
           "rejected": reply(text)} for i, text in enumerate(wrong)]


def sample_pairs(graphdef: Any, params: Any, tokenizer: Any, template: str,
                 items: Sequence[dict[str, Any]], cfg: OnPolicyPairs
                 ) -> tuple[list[Pair], dict[str, int]]:
  """Samples `cfg.samples` completions of each `{messages, answer}` item from the model and
  pairs them (`pairs_from_samples`). Every process samples every item with the same seed,
  so every process gets the same pairs.

  Returns:
    (pairs, counts): counts of questions, samples, correct samples, pairs, and pairs whose
    chosen reply is the reference answer (no sample was right).
  """
  counts = {"questions": len(items), "samples": 0, "correct": 0, "pairs": 0,
            "pairs_reference_chosen": 0}
  if not items:
    return [], counts
  sampler = Sampler(graphdef, params, tokenizer,
                    eos_ids=chat.stop_token_ids(tokenizer, template))
  prompts = [chat.prompt_ids(it["messages"], template, tokenizer) for it in items]
  out = sampler.sample(prompts, max_new_tokens=cfg.max_new_tokens, num_samples=cfg.samples,
                       temperature=cfg.temperature, seed=cfg.seed)
  pairs: list[Pair] = []
  for item, texts in zip(items, out.texts):
    correct = [reference_match(t, item["answer"]) > 0 for t in texts]
    made = pairs_from_samples(item["messages"], texts, correct, item["answer"])
    counts["samples"] += len(texts)
    counts["correct"] += sum(correct)
    counts["pairs_reference_chosen"] += 0 if any(correct) else len(made)
    pairs.extend(made)
  counts["pairs"] = len(pairs)
  return pairs, counts
