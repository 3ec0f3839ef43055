"""A reward model's pairwise accuracy on a policy's own answers to held-out questions.

What `rm.on_policy` logs as `on_policy/accuracy` while training, measured here for any reward
model (one trained without on-policy pairs too): the policy answers each held-out built-in
question `--samples` times at `--temperature`; each distinct wrong answer is paired with a
right one of the same question (the reference answer when none is right), exactly as
`llmjax.preference.on_policy` pairs them; the accuracy is the fraction of pairs the reward
model scores right above wrong. Also the accuracy on the built-in held-out pairs (a true
answer over a made-up wrong one). The same pairs as the rm stage's evaluation, so for a
reward model trained with `rm.on_policy` the numbers equal its last eval's. Prints a markdown
row.

  python bench/rm_on_policy_accuracy.py --policy=runs/tiny_rlhf:sft --rm=runs/tiny_rlhf:rm
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--policy", required=True, help="workdir:stage of the policy")
  parser.add_argument("--rm", required=True, help="workdir:stage of the reward model")
  parser.add_argument("--questions", type=int, default=200)
  parser.add_argument("--samples", type=int, default=4)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--max_new_tokens", type=int, default=24)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--template", default="chatml")
  args = parser.parse_args()

  from llmjax.data import preferences
  from llmjax.parallel import mesh as mesh_lib
  from llmjax.preference.on_policy import OnPolicyPairs
  from llmjax.stages.context import RunContext
  from llmjax.stages.preference_data import PreferenceSplits
  from llmjax.stages.reward_model import HeldOutPairs, on_policy_examples

  ctx = RunContext(workdir="/nonexistent")
  policy, rm = ctx.resolve(args.policy, "--policy"), ctx.resolve(args.rm, "--rm")
  # The rm stage's held-out split (tiny/reward_model.gin's data); its first `--questions`
  # questions are the ones `rm.on_policy` evaluates.
  data = preferences.PreferenceDataConfig(seq_len=256, batch_size=8, max_pairs_per_row=4)
  _, held, _ = preferences.load_pairs(data)
  synthetic, _ = preferences.tokenize_pairs(held, policy.tokenizer, args.template,
                                            data.seq_len, data.overlong)
  cfg = OnPolicyPairs(samples=args.samples, temperature=args.temperature,
                      max_new_tokens=args.max_new_tokens, eval_questions=args.questions,
                      seed=args.seed)
  splits = PreferenceSplits(policy.tokenizer, [], [], [], held, {})
  _, own, counts = on_policy_examples(policy, splits, cfg, data, args.template)
  mesh, rules = mesh_lib.mesh_and_rules(None, None)
  graphdef, params = rm.float_model()
  row = {}
  for name, examples in (("builtin", synthetic), ("on_policy", own)):
    every = preferences.PreferenceDataConfig(seq_len=256, batch_size=8, max_pairs_per_row=4,
                                             eval_batches=len(examples))
    held_out = HeldOutPairs(preferences.eval_batches(examples, every), 4, "", mesh, rules)
    row[name] = held_out(graphdef, params)
  print(f"| {args.rm} | {row['builtin']['accuracy']:.3f} ({row['builtin']['pairs']} pairs) | "
        f"{row['on_policy']['accuracy']:.3f} ({row['on_policy']['pairs']} pairs; "
        f"{counts['on_policy_eval_correct']}/{counts['on_policy_eval_samples']} samples "
        f"right) |")


if __name__ == "__main__":
  main()
