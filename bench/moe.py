"""Tiny MoE vs a dense model of the same active parameters, and MoE's own switches.

Each variant pretrains from the same seed on the same built-in batches through the real
stage (`stages.pretrain`: data pipeline, loop, evaluation), and the table reads its
`metrics.jsonl`: the final eval loss, tokens/s (the loop's, compile excluded), and the
experts' load balance (`moe/max_load`: the busiest expert's share of the assignments over
the mean share; 1 is perfect balance, 8 everything on one expert), averaged over the last
quarter of the logged steps.

  dense        `tiny` with d_ff 256 = top-2 x 128: the MoE's active MLP width
  moe          `tiny_moe` (8 experts of width 128, top-2), dropless, router aux coef 0.01
               (--d_ff_expert narrows the experts, and the dense d_ff with them)
  moe_no_aux   the same with router_aux_loss_coef 0: how balanced routing stays untaught
  moe_capacity the same with moe_capacity_factor 1.25: the static-buffer path, step time

  python bench/moe.py --steps=200 --batch_size=8 --seq_len=128
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile

from absl import app, flags

flags.DEFINE_integer("steps", 200, "train steps per variant")
flags.DEFINE_integer("batch_size", 8, "rows per step")
flags.DEFINE_integer("seq_len", 128, "tokens per row")
flags.DEFINE_float("learning_rate", 3e-3, "peak learning rate")
flags.DEFINE_list("variants", ["dense", "moe", "moe_no_aux", "moe_capacity"], "which to run")
flags.DEFINE_integer("d_ff_expert", 128, "expert width (the dense model's d_ff is top-k times it)")
flags.DEFINE_string("workdir", None, "where the runs go (default: a temporary directory)")
FLAGS = flags.FLAGS


def variants() -> dict:
  from llmjax.model.config import PRESETS
  moe = dataclasses.replace(PRESETS["tiny_moe"], d_ff_expert=FLAGS.d_ff_expert)
  dense = dataclasses.replace(PRESETS["tiny"], d_ff=moe.n_experts_per_token * moe.d_ff_expert)
  return {"dense": dense, "moe": moe,
          "moe_no_aux": dataclasses.replace(moe, router_aux_loss_coef=0.0),
          "moe_capacity": dataclasses.replace(moe, moe_capacity_factor=1.25)}


def run(name, cfg, workdir, tokenizer_path) -> dict:
  from llmjax.data.pipeline import DataConfig
  from llmjax.metrics import read_metrics
  from llmjax.stages import RunContext, run_stages
  from llmjax.stages.context import TokenizerConfig
  from llmjax.stages.pretrain import Pretrain
  from llmjax.train import loop
  from llmjax.train.optimizer import OptimizerConfig

  steps = FLAGS.steps
  stage = Pretrain(
      model=cfg,
      data=DataConfig(seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_size, eval_batches=4),
      train=loop.TrainConfig(total_steps=steps, log_every=10, eval_every=steps,
                             checkpoint_every=steps),
      optimizer=OptimizerConfig(learning_rate=FLAGS.learning_rate, warmup_steps=steps // 10,
                                weight_decay=0.1),
      tokenizer=TokenizerConfig(path=tokenizer_path))
  out = os.path.join(workdir, name)
  run_stages([stage], RunContext(workdir=out))
  records = read_metrics(out)
  train = [r for r in records if r["kind"] == "train"]
  (final,) = [r for r in records if r["kind"] == "eval"]
  tail = train[-max(1, len(train) // 4):]
  mean = lambda key: statistics.mean(r[key] for r in tail) if key in tail[0] else None
  return {"params": cfg.num_params(), "active": cfg.num_active_params(),
          "eval_loss": final["loss"], "tokens_per_sec": statistics.median(
              r["tokens_per_sec"] for r in train if "tokens_per_sec" in r),
          "max_load": mean("moe/max_load"), "dropped": mean("moe/dropped_fraction"),
          "lb_loss": mean("moe/load_balancing_loss")}


def main(_):
  from llmjax.data import synthetic
  from llmjax.data.tokenizer import train_tokenizer
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="moe_bench_")
  tokenizer_path = os.path.join(workdir, "tokenizer.model")
  if not os.path.exists(tokenizer_path):
    train_tokenizer(synthetic.pretraining_documents("train", 2000), tokenizer_path,
                    vocab_size=512)
  rows = []
  for name in FLAGS.variants:
    r = run(name, variants()[name], workdir, tokenizer_path)
    step_ms = 1000 * FLAGS.batch_size * FLAGS.seq_len / r["tokens_per_sec"]
    fmt = lambda v, f: "n/a" if v is None else format(v, f)
    rows.append(f"| {name} | {r['params'] / 1e6:.2f}M | {r['active'] / 1e6:.2f}M | "
                f"{r['eval_loss']:.3f} | {r['tokens_per_sec']:,.0f} | {step_ms:.1f} ms | "
                f"{fmt(r['max_load'], '.2f')} | {fmt(r['lb_loss'], '.3f')} | "
                f"{fmt(r['dropped'], '.3f')} |")
    print(rows[-1], flush=True)
  print(f"\n{FLAGS.steps} steps of {FLAGS.batch_size}x{FLAGS.seq_len} tokens, experts of "
        f"width {FLAGS.d_ff_expert}\n")
  print("| variant | params | active | eval loss | tokens/s | step | max/mean load | "
        "load-balancing loss | dropped |")
  print("|---|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  app.run(main)
