"""The MoE bench's fact corpus (bench/moe.py --data=facts): made-up people with five random
attributes each, bios about them in shuffled phrasings, written as JSONL for the user-data
path, and the eval bios' loss split into nats per fact and per other token.

Deterministic (numpy Generators with fixed seeds); no absl flags, so tests import it.
"""

from __future__ import annotations

import json
import os

import numpy as np

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
