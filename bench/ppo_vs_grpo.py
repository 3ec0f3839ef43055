"""PPO vs GRPO step time on the same model and batch: what the value and reward models cost.

Both stages run through their real code (`llmjax.stages.ppo`, `llmjax.stages.grpo`) on the
same policy (the `tiny` preset, random init), the same prompts (the built-in questions) and
the same number of completions per step (`--rows`: PPO one per prompt, GRPO `--group` per
prompt), `--new_tokens` each, one optimizer step per rollout. A random policy seldom stops, so
both generate the whole budget: equal work by construction. Per step (from the stages'
metrics, compile and the first step excluded): wall seconds, sampling seconds, the rollout's
scoring seconds (PPO: policy, reference, value and reward forward passes and GAE in one
program; GRPO: the host-side rewards and advantages) and the rest (the train step).

  python bench/ppo_vs_grpo.py --steps=8 --rows=16 --new_tokens=24
"""

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--rows", type=int, default=16)
  parser.add_argument("--group", type=int, default=4)
  parser.add_argument("--new_tokens", type=int, default=24)
  args = parser.parse_args()

  import jax
  import numpy as np
  from flax import nnx

  from llmjax.data import prompts as prompts_lib, synthetic
  from llmjax.data.tokenizer import Tokenizer, train_tokenizer
  from llmjax.metrics import read_metrics
  from llmjax.model.config import PRESETS
  from llmjax.model.reward import init_reward_model, reward_config
  from llmjax.model.transformer import build_model
  from llmjax.stages import RunContext, run_stages
  from llmjax.stages.context import StageOutput, TokenizerConfig
  from llmjax.stages.grpo import GRPOConfig, grpo_stage
  from llmjax.stages.ppo import PPOConfig, ppo_stage
  from llmjax.train import loop
  from llmjax.train.optimizer import OptimizerConfig

  tmp = tempfile.mkdtemp(prefix="ppo_vs_grpo_")
  tok_path = os.path.join(tmp, "tokenizer.model")
  train_tokenizer(synthetic.pretraining_documents("train", 2000), tok_path, vocab_size=512)
  tokenizer = Tokenizer.load(tok_path)
  model = dataclasses.replace(PRESETS[args.preset], vocab_size=512)
  graphdef, params = nnx.split(build_model(model, seed=1))
  rm_cfg = reward_config(model)
  rm_graphdef = nnx.graphdef(build_model(rm_cfg, seed=2))
  rm_params = init_reward_model(params, rm_cfg, seed=2)
  total = args.steps + 2
  train = loop.TrainConfig(total_steps=total, log_every=1, eval_every=10**6,
                           checkpoint_every=10**6)
  opt = OptimizerConfig(learning_rate=1e-5, warmup_steps=1)

  def data(prompts):
    return prompts_lib.PromptDataConfig(format="builtin_questions", max_prompt_tokens=64,
                                        prompts_per_step=prompts, builtin_train=256,
                                        builtin_eval=1, eval_prompts=1)

  def context(workdir):
    ctx = RunContext(workdir=workdir, tokenizer=tokenizer)
    source = lambda name: {"workdir": workdir, "stage": name, "step": 1}
    ctx.outputs["sft"] = StageOutput(graphdef, params, model, source("sft"), tokenizer)
    ctx.outputs["rm"] = StageOutput(rm_graphdef, rm_params, rm_cfg, source("rm"), tokenizer)
    ctx.last_stage = "sft"
    return ctx

  stages = {
      "ppo": ppo_stage(model=model, data=data(args.rows), train=train, optimizer=opt,
                       tokenizer=TokenizerConfig(path=tok_path),
                       ppo=PPOConfig(max_new_tokens=args.new_tokens, temperature=1.0,
                                     num_ppo_epochs=1, num_mini_batches=1)),
      "grpo": grpo_stage(model=model, data=data(args.rows // args.group), train=train,
                         optimizer=opt, tokenizer=TokenizerConfig(path=tok_path),
                         grpo=GRPOConfig(num_generations=args.group,
                                         max_new_tokens=args.new_tokens, temperature=1.0,
                                         rewards=("length_penalty",), beta=0.04)),
  }
  print(f"{args.preset} ({sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f}M params), "
        f"{args.rows} completions x {args.new_tokens} new tokens per step, "
        f"{args.steps} timed steps, {jax.devices()[0].platform}")
  print("| stage | step | sampling | scoring | train step | new tokens |")
  print("|---|---|---|---|---|---|")
  for name, st in stages.items():
    workdir = os.path.join(tmp, name)
    run_stages([st], context(workdir))
    rows = [m for m in read_metrics(workdir) if m["kind"] == "train" and m["step"] > 2]
    # tokens_per_sec covers the whole step (rollout included) since the previous record.
    step = [(args.rows * (64 + args.new_tokens)) / m["tokens_per_sec"]
            for m in rows]
    sample = [m["rollout_seconds"] for m in rows]
    scoring = [m["rollout_score_seconds"] for m in rows]
    med = statistics.median
    print(f"| {name} | {med(step) * 1e3:.0f} ms | {med(sample) * 1e3:.0f} ms | "
          f"{med(scoring) * 1e3:.0f} ms | {(med(step) - med(sample) - med(scoring)) * 1e3:.0f} ms"
          f" | {np.mean([m['completion_length'] for m in rows]):.1f} |")


if __name__ == "__main__":
  main()
