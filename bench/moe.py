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
import json
import os
import statistics
import tempfile

from absl import app, flags
import numpy as np

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

# The fact corpus: values are common words; names are made up from syllables, so a person is
# several tokens and nothing about a name predicts its attributes.
_SYLLABLES = ("ka", "ro", "mi", "tal", "ven", "dor", "li", "sa", "bel", "nu", "gar", "fi",
              "zen", "po", "ru", "them", "wa", "xi", "lo", "mar", "de", "qua", "ish", "bo")
FACT_VALUES = {
    "city": ("Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Berlin", "Madrid", "Dublin",
             "Vienna", "Prague", "Lisbon", "Quito", "Delhi", "Seoul", "Sydney", "Nairobi",
             "Boston", "Denver", "Toronto", "Havana", "Athens", "Warsaw", "Manila"),
    "colour": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white",
               "grey", "pink", "brown", "silver"),
    "pet": ("a cat", "a dog", "an owl", "a rabbit", "a parrot", "a hamster", "a turtle",
            "a goldfish", "a horse", "an iguana", "a ferret", "a snake"),
    "job": ("a baker", "a doctor", "a teacher", "an engineer", "a farmer", "a pilot",
            "a painter", "a nurse", "a chef", "a librarian", "a lawyer", "a dentist",
            "a plumber", "a singer", "a sailor", "a tailor"),
    "year": tuple(str(y) for y in range(1950, 2000)),
}
_FACT_TEMPLATES = {
    "city": ("{name} lives in {v}.", "{name}'s home is in {v}.", "{name} is from {v}.",
             "The city where {name} lives is {v}."),
    "colour": ("{name}'s favourite colour is {v}.", "{name} likes {v} best.",
               "Of all colours, {name} prefers {v}.", "The favourite colour of {name} is {v}."),
    "pet": ("{name} has {v}.", "{name} keeps {v} as a pet.", "The pet of {name} is {v}.",
            "{name} takes care of {v} at home."),
    "job": ("{name} works as {v}.", "By profession, {name} is {v}.",
            "{name} earns a living as {v}.", "The job of {name}: {v}."),
    "year": ("{name} was born in {v}.", "{name}'s year of birth is {v}.",
             "The birth year of {name} is {v}.", "{name} came into the world in {v}."),
}


def fact_people(n: int, seed: int = 0) -> list[tuple[str, dict[str, str]]]:
  """`n` made-up people (unique two-word names) with one random value per attribute."""
  rng = np.random.default_rng([seed, 1])
  names, people = set(), []
  while len(people) < n:
    name = " ".join("".join(rng.choice(_SYLLABLES, rng.integers(2, 4))).capitalize()
                    for _ in range(2))
    facts = {a: str(rng.choice(values)) for a, values in FACT_VALUES.items()}
    if name not in names:  # a repeated name would give one person two sets of facts
      names.add(name)
      people.append((name, facts))
  return people


def fact_bios(people: list[tuple[str, dict[str, str]]], copies: int,
              seed: int) -> list[tuple[str, list[tuple[int, int]]]]:
  """`copies` bios per person, in shuffled order, each with the character spans of its five
  values: a bio states all of the person's facts in a random order and random phrasings,
  so two bios of one person are different texts."""
  rng = np.random.default_rng([seed, 2])
  bios = []
  for name, facts in people:
    for _ in range(copies):
      text, spans = "", []
      for attribute in rng.permutation(list(facts)):
        template = str(rng.choice(_FACT_TEMPLATES[attribute]))
        text += " " if text else ""
        start = len(text) + len(template.split("{v}")[0].format(name=name))
        spans.append((start, start + len(facts[attribute])))
        text += template.format(name=name, v=facts[attribute])
      bios.append((text, spans))
  return [bios[i] for i in rng.permutation(len(bios))]


def fact_documents(people: list[tuple[str, dict[str, str]]], copies: int,
                   seed: int) -> list[str]:
  """The texts of `fact_bios`."""
  return [text for text, _ in fact_bios(people, copies, seed)]


def write_fact_corpus(workdir: str, entities: int) -> tuple[str, str]:
  """train.jsonl (20 bios per person) and eval.jsonl (one new bio per person) in `workdir`."""
  people = fact_people(entities)
  paths = []
  for split, copies, seed in (("train", 20, 0), ("eval", 1, 1)):
    path = os.path.join(workdir, f"facts_{entities}_{split}.jsonl")
    if not os.path.exists(path):
      with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in fact_documents(people, copies, seed))
      os.replace(path + ".tmp", path)
    paths.append(path)
  return paths[0], paths[1]


def fact_losses(workdir: str, people: list[tuple[str, dict[str, str]]]) -> tuple[float, float]:
  """(nats per fact, nats per other token) a trained run spends on the eval bios (one per
  person, as in eval.jsonl): the first is -log p summed over the tokens of each stated
  value, averaged over the facts (0: every fact known; `FACT_PRIOR_NATS`: none known, only
  the values' distribution); the second is the mean over every other token (names, phrasing,
  eos), which takes no knowledge of the facts."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from llmjax.runs.load import load_run
  run_ = load_run(workdir)
  model = nnx.merge(run_.graphdef, run_.params)
  sp = run_.tokenizer._sp  # the SentencePiece processor: its pieces carry byte offsets
  bios = fact_bios(people, 1, seed=1)
  rows, is_value = [], []
  for text, spans in bios:
    pieces = sp.encode(text, return_type="proto").pieces
    rows.append([sp.bos_id()] + [p.id for p in pieces] + [sp.eos_id()])
    # The text is ASCII, so byte offsets are character offsets.
    is_value.append([any(p.begin < end and start < p.end for start, end in spans)
                     for p in pieces] + [False])
  width = max(map(len, rows))
  tokens = np.zeros((len(rows), width), np.int32)
  segments = np.zeros((len(rows), width), np.int32)
  value_mask = np.zeros((len(rows), width - 1), bool)
  for r, row in enumerate(rows):
    tokens[r, :len(row)], segments[r, :len(row)] = row, 1
    value_mask[r, :len(row) - 1] = is_value[r]
  other_mask = (segments[:, 1:] > 0) & ~value_mask
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)

  @jax.jit
  def logprobs(tokens, positions, segments):  # [rows, width - 1]: log p(tokens[:, i + 1])
    logits = model(tokens, positions, segments)[:, :-1]
    picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)

  nll = -np.asarray(logprobs(tokens, positions, segments))
  facts = sum(len(spans) for _, spans in bios)
  return float(nll[value_mask].sum() / facts), float(nll[other_mask].mean())


# What a model that knows no fact pays per fact: the entropy of the (uniform) values.
FACT_PRIOR_NATS = float(np.mean([np.log(len(v)) for v in FACT_VALUES.values()]))


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
