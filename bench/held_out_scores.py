"""Both held-out scores of the tiny world for any checkpoint: facts and word problems.

Each stage logs only its own score: SFT, DPO and PPO the exact match of held-out questions,
GRPO the accuracy on held-out word problems. This measures both for any `workdir:stage[@step]`
with the stages' own code and items, so a GRPO checkpoint's exact match shows what training
on word problems alone did to the facts (and an SFT checkpoint's accuracy what GRPO starts
from). Greedy; the same numbers the stages log (SFT's `eval_questions` = 200 questions, 16 new
tokens; GRPO's `eval_prompts` = 200 problems, 48 new tokens). Prints one markdown row per
checkpoint: exact match (right / asked per question kind) and word-problem accuracy.

  python bench/held_out_scores.py runs/tiny_full:dpo runs/tiny_full:grpo@100 runs/tiny_full:grpo
"""

import argparse
import collections
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse(spec: str) -> tuple[str, str, int | None]:
  """'workdir:stage[@step]' -> (workdir, stage, step or None for the latest)."""
  where, _, step = spec.partition("@")
  workdir, _, stage = where.rpartition(":")
  if not workdir or not stage:
    raise SystemExit(f"{spec!r}: give workdir:stage or workdir:stage@step")
  return workdir, stage, int(step) if step else None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("checkpoints", nargs="+", help="workdir:stage[@step]")
  parser.add_argument("--questions", type=int, default=200)
  parser.add_argument("--problems", type=int, default=200)
  parser.add_argument("--template", default="chatml")
  args = parser.parse_args()

  from llmjax.data import chat, instructions, synthetic
  from llmjax.data import prompts as prompts_lib
  from llmjax.runs.load import load_run
  from llmjax.sample.sampler import Sampler
  from llmjax.stages.grpo import accuracy

  # SFT's eval items (`SFTDataConfig.builtin_eval` = 300 questions, the first 200 asked) and
  # their kinds: `builtin_conversations('eval')` keeps `qa_pairs('eval')`'s order.
  pairs = synthetic.qa_pairs("eval", 300)[:args.questions]
  items = instructions.reference_items(instructions.builtin_conversations("eval", 300))
  items = items[:args.questions]
  problem_cfg = prompts_lib.PromptDataConfig(format="builtin", max_prompt_tokens=96,
                                             eval_prompts=args.problems)
  print("| checkpoint | exact match | by kind | word-problem accuracy |")
  print("|---|---|---|---|")
  for spec in args.checkpoints:
    run = load_run(*parse(spec))
    graphdef, params = run.float_model()
    tokenizer = run.tokenizer
    sampler = Sampler(graphdef, params, tokenizer,
                      eos_ids=chat.stop_token_ids(tokenizer, args.template))
    out = sampler.sample([chat.prompt_ids(it["messages"], args.template, tokenizer)
                          for it in items], max_new_tokens=16)
    norm = instructions.normalize_answer
    by_kind = collections.defaultdict(lambda: [0, 0])
    for i, (item, pair) in enumerate(zip(items, pairs)):
      by_kind[pair["attribute"]][0] += norm(out.texts[i][0]) == norm(item["answer"])
      by_kind[pair["attribute"]][1] += 1
    exact = sum(right for right, _ in by_kind.values()) / len(items)
    _, held_out, _ = prompts_lib.prompt_data(problem_cfg, tokenizer, args.template)
    held_out = prompts_lib.eval_prompts(held_out, problem_cfg, 0, 1)
    solved = accuracy(graphdef, params, tokenizer, args.template, held_out, 48)["accuracy"]
    kinds = ", ".join(f"{k} {r}/{n}" for k, (r, n) in sorted(by_kind.items()))
    print(f"| {spec} (step {run.step}) | "
          f"{exact:.3f} | {kinds} | {solved:.3f} |", flush=True)


if __name__ == "__main__":
  main()
