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

--data=facts trains on a corpus where capacity matters instead of the built-in world: bios
of --entities made-up people, each with five random attributes (`fact_bios`), written as
JSONL into the workdir and read through the ordinary user-data path (DataConfig
format=jsonl). The eval bios restate the same facts in new documents (another attribute
order and other phrasings). The table then splits the eval bios' loss (`fact_losses`):
nats per fact (summed over a stated value's tokens: what the model has stored) and nats per
other token (names and phrasing: no fact knowledge needed). --dense_d_ff adds dense rows of
other widths, to check that width pays on the data (a wider dense model must do clearly
better, or there is nothing for the MoE's extra parameters to win).

  python bench/moe.py --data=facts --entities=300 --variants=dense,moe --d_ff_expert=64 \
      --dense_d_ff=512 --steps=600 --batch_size=16 --eval_batches=8 --seed=0
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.fact_corpus import (FACT_PRIOR_NATS, fact_documents, fact_losses, fact_people,
                               write_fact_corpus)

flags.DEFINE_integer("steps", 200, "train steps per variant")
flags.DEFINE_integer("batch_size", 8, "rows per step")
flags.DEFINE_integer("seq_len", 128, "tokens per row")
flags.DEFINE_float("learning_rate", 3e-3, "peak learning rate")
flags.DEFINE_list("variants", ["dense", "moe", "moe_no_aux", "moe_capacity"], "which to run")
flags.DEFINE_integer("d_ff_expert", 128, "expert width (the dense model's d_ff is top-k times it)")
flags.DEFINE_string("workdir", None, "where the runs go (default: a temporary directory)")
flags.DEFINE_enum("data", "builtin", ["builtin", "facts"], "the built-in world, or the "
                  "fact corpus (`fact_bios`), where MLP width pays")
flags.DEFINE_integer("entities", 300, "--data=facts: people in the fact corpus")
flags.DEFINE_list("dense_d_ff", [], "extra dense variants of these MLP widths")
flags.DEFINE_integer("seed", 0, "parameter init and data order")
flags.DEFINE_integer("eval_batches", 4, "held-out batches per evaluation")
FLAGS = flags.FLAGS

def variants() -> dict:
  from llmjax.model.config import PRESETS
  moe = dataclasses.replace(PRESETS["tiny_moe"], d_ff_expert=FLAGS.d_ff_expert)
  dense = dataclasses.replace(PRESETS["tiny"], d_ff=moe.n_experts_per_token * moe.d_ff_expert)
  out = {"dense": dense, "moe": moe,
         "moe_no_aux": dataclasses.replace(moe, router_aux_loss_coef=0.0),
         "moe_capacity": dataclasses.replace(moe, moe_capacity_factor=1.25)}
  for d_ff in FLAGS.dense_d_ff:
    out[f"dense_{d_ff}"] = dataclasses.replace(PRESETS["tiny"], d_ff=int(d_ff))
  return out


def run(name, cfg, workdir, tokenizer_path, data_paths) -> dict:
  from llmjax.data.pipeline import DataConfig
  from llmjax.metrics import read_metrics
  from llmjax.stages import RunContext, run_stages
  from llmjax.stages.context import TokenizerConfig
  from llmjax.stages.pretrain import Pretrain
  from llmjax.train import loop
  from llmjax.train.optimizer import OptimizerConfig

  steps = FLAGS.steps
  data = DataConfig(seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_size,
                    eval_batches=FLAGS.eval_batches, seed=FLAGS.seed)
  if data_paths:
    data = dataclasses.replace(data, format="jsonl", train_paths=data_paths[:1],
                               eval_paths=data_paths[1:])
  stage = Pretrain(
      model=cfg, data=data,
      train=loop.TrainConfig(total_steps=steps, log_every=10, eval_every=steps,
                             checkpoint_every=steps, seed=FLAGS.seed),
      optimizer=OptimizerConfig(learning_rate=FLAGS.learning_rate, warmup_steps=steps // 10,
                                weight_decay=0.1),
      tokenizer=TokenizerConfig(path=tokenizer_path))
  out = os.path.join(workdir, name)
  run_stages([stage], RunContext(workdir=out))
  fact_nats, other_nats = (fact_losses(out, fact_people(FLAGS.entities)) if data_paths
                           else (None, None))
  records = read_metrics(out)
  train = [r for r in records if r["kind"] == "train"]
  (final,) = [r for r in records if r["kind"] == "eval"]
  tail = train[-max(1, len(train) // 4):]
  mean = lambda key: statistics.mean(r[key] for r in tail) if key in tail[0] else None
  return {"params": cfg.num_params(), "active": cfg.num_active_params(),
          "eval_loss": final["loss"], "tokens_per_sec": statistics.median(
              r["tokens_per_sec"] for r in train if "tokens_per_sec" in r),
          "max_load": mean("moe/max_load"), "dropped": mean("moe/dropped_fraction"),
          "lb_loss": mean("moe/load_balancing_loss"), "fact_nats": fact_nats,
          "other_nats": other_nats}


def main(_):
  from llmjax.data import synthetic
  from llmjax.data.tokenizer import train_tokenizer
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="moe_bench_")
  os.makedirs(workdir, exist_ok=True)
  if FLAGS.data == "facts":
    data_paths = write_fact_corpus(workdir, FLAGS.entities)
    tokenizer_path = os.path.join(workdir, f"facts_{FLAGS.entities}_tokenizer.model")
    documents = fact_documents(fact_people(FLAGS.entities), 1, 0)
  else:
    data_paths = ()
    tokenizer_path = os.path.join(workdir, "tokenizer.model")
    documents = synthetic.pretraining_documents("train", 2000)
  if not os.path.exists(tokenizer_path):
    train_tokenizer(documents, tokenizer_path, vocab_size=512)
  rows = []
  for name in FLAGS.variants + [f"dense_{d}" for d in FLAGS.dense_d_ff]:
    r = run(f"{name}_seed{FLAGS.seed}", variants()[name], workdir, tokenizer_path, data_paths)
    step_ms = 1000 * FLAGS.batch_size * FLAGS.seq_len / r["tokens_per_sec"]
    fmt = lambda v, f: "n/a" if v is None else format(v, f)
    rows.append(f"| {name} | {r['params'] / 1e6:.2f}M | {r['active'] / 1e6:.2f}M | "
                f"{r['eval_loss']:.3f} | {fmt(r['fact_nats'], '.3f')} | "
                f"{fmt(r['other_nats'], '.3f')} | "
                f"{r['tokens_per_sec']:,.0f} | {step_ms:.1f} ms | "
                f"{fmt(r['max_load'], '.2f')} | {fmt(r['lb_loss'], '.3f')} | "
                f"{fmt(r['dropped'], '.3f')} |")
    print(rows[-1], flush=True)
  prior = f"; nats/fact {FACT_PRIOR_NATS:.3f} = no fact known" if data_paths else ""
  print(f"\n{FLAGS.data} data, {FLAGS.steps} steps of {FLAGS.batch_size}x{FLAGS.seq_len} "
        f"tokens, experts of width {FLAGS.d_ff_expert}, seed {FLAGS.seed}{prior}\n")
  print("| variant | params | active | eval loss | nats/fact | nats/other token | tokens/s | "
        "step | max/mean load | load-balancing loss | dropped |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  app.run(main)
