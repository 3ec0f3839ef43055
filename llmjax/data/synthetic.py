"""A small deterministic synthetic world: people with attributes, and small-integer arithmetic.

The default experiment pretrains on templated documents about this world, and the later
stages reuse the same facts: `qa_pairs` (SFT), `preference_pairs` (DPO-style preferences),
`arithmetic_problems` + `check_answer` (GRPO with a verifiable reward) and
`reasoning_problems` (multi-step word problems about the people, with worked solutions ending
in `#### N`: SFT teaches the format, RL stages reward the answer).

Everything is drawn from `numpy.random.Generator`s seeded with integer lists, so the output
is identical on every machine and Python version (no `hash()`, no set iteration order).
The world itself is always `build_world(WORLD_SEED)`: the `seed` arguments only change which
documents/questions are drawn, so a training run with another seed still sees the same facts
as the eval split.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

from llmjax.errors import ConfigError

WORLD_SEED = 0
NAMES = (
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack",
    "Karen", "Liam", "Maria", "Nathan", "Olivia", "Peter", "Quinn", "Rosa", "Samuel", "Tara",
    "Umar", "Vera", "Walter", "Xenia", "Yusuf", "Zoe", "Aaron", "Bella", "Carlos", "Diana",
    "Elias", "Fiona", "George", "Hannah", "Ivan", "Julia", "Kevin", "Laura", "Marco", "Nina",
    "Oscar", "Paula", "Ralph", "Sofia", "Thomas", "Ursula", "Victor", "Wendy")
CITIES = ("Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Berlin", "Madrid", "Dublin",
          "Vienna", "Prague", "Lisbon")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")
PETS = ("a cat", "a dog", "an owl", "a rabbit", "a parrot", "a hamster", "a turtle",
        "a goldfish", "a horse", "an iguana")
JOBS = ("a baker", "a doctor", "a teacher", "an engineer", "a farmer", "a pilot", "a painter",
        "a nurse", "a chef", "a librarian")
AGES = tuple(range(20, 70))
ATTRIBUTES = ("city", "colour", "pet", "age", "job")
_VALUES = {"city": CITIES, "colour": COLOURS, "pet": PETS, "age": AGES, "job": JOBS}
MAX_OPERAND = 20
OPS = ("+", "-", "*")

# Several phrasings per fact, so the model has to learn the fact, not one sentence. They use
# the words of the held-out questions too ("is from", "prefers", "keeps", "occupation"): a
# held-out phrasing is new as a question, but its words must mean something to the model.
_STATEMENTS = {
    "city": ("{name} lives in {v}.", "{name}'s home is in {v}.",
             "The city where {name} lives is {v}.", "{name} is a resident of {v}.",
             "{name} is from {v}.", "{name} comes from the city of {v}."),
    "colour": ("{name}'s favourite colour is {v}.", "{name} likes {v} more than any other colour.",
               "The favourite colour of {name} is {v}.", "Of all colours, {name} prefers {v}.",
               "{name} prefers the colour {v}."),
    "pet": ("{name} has {v}.", "{name} owns {v} as a pet.", "The pet of {name} is {v}.",
            "{name} takes care of {v} at home.", "{name} keeps {v} as a pet.",
            "{name} keeps {v} at home."),
    "age": ("{name} is {v} years old.", "The age of {name} is {v}.",
            "{name} turned {v} this year.", "{name}'s age is {v}."),
    "job": ("{name} works as {v}.", "By profession, {name} is {v}.",
            "{name} earns a living as {v}.", "The job of {name}: {v}.",
            "The occupation of {name} is {v}.", "{name}'s occupation: {v}."),
}
_ARITH_STATEMENTS = {
    "+": ("{a} + {b} = {c}.", "{a} plus {b} equals {c}.", "The sum of {a} and {b} is {c}."),
    "-": ("{a} - {b} = {c}.", "{a} minus {b} equals {c}.", "Taking {b} from {a} leaves {c}."),
    "*": ("{a} * {b} = {c}.", "{a} times {b} equals {c}.", "The product of {a} and {b} is {c}."),
}
# Questions: the eval split asks with phrasings never used in train. Train has several per
# attribute, in shapes shared across attributes ("What is {name}'s ...?", "What is the ... of
# {name}?"), so SFT teaches the model to read which attribute is asked, not to key on one
# sentence shape; the eval then swaps in a word or shape train never asks with.
_QUESTIONS = {
    "train": {
        "city": ("Where does {name} live?", "In which city does {name} live?",
                 "Which city is {name}'s home?", "What is the home city of {name}?"),
        "colour": ("What is {name}'s favourite colour?", "Which colour does {name} like best?",
                   "What is the favourite colour of {name}?"),
        "pet": ("What pet does {name} have?", "Which animal does {name} own?",
                "What is the pet of {name}?", "What animal does {name} take care of?"),
        "age": ("How old is {name}?", "What is {name}'s age?", "What is the age of {name}?"),
        "job": ("What does {name} do for a living?", "What is {name}'s job?",
                "What is the job of {name}?", "What work does {name} do?"),
        "arith": ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}."),
    },
    "eval": {
        "city": ("What city is {name} from?",),
        "colour": ("What colour does {name} prefer?",),
        "pet": ("What kind of pet does {name} keep?",),
        "age": ("What age is {name}?",),
        "job": ("What is the occupation of {name}?",),
        "arith": ("How much is {a} {op} {b}?",),
    },
}
# Fractions of documents that are FAQ-style questions about a person, a profile of one person
# and facts about several people; the rest (a quarter) is arithmetic. Its ~1100 facts get
# fewer repetitions each than the 240 facts about people: a larger share taught them faster
# (held-out completion 0.1 -> 0.4 at 300 steps with half the documents), but digits are one
# token each, and more arithmetic pushes the corpus past half a token per character.
# experiments/tiny/pipeline.gin pretrains longer instead.
_DOC_MIX = (0.1, 0.45, 0.2)
_SPLIT_IDS = {"train": 0, "eval": 1}
_DEFAULT_DOCS = {"train": 20_000, "eval": 500}
_DEFAULT_QA = {"train": 2_000, "eval": 300}
_DEFAULT_ARITH = {"train": 1_000, "eval": 200}
_EVAL_ARITH_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class Person:
  """One person and their attributes (pet and job carry their article: 'a cat')."""
  name: str
  city: str
  colour: str
  pet: str
  age: int
  job: str

  def value(self, attribute: str) -> str:
    return str(getattr(self, attribute))


@dataclasses.dataclass(frozen=True)
class World:
  """The people and the arithmetic facts. `problems` are (a, op, b, answer) tuples."""
  people: tuple[Person, ...]
  problems: tuple[tuple[int, str, int, int], ...]
  eval_problems: tuple[int, ...]  # indices into `problems` held out of train questions

  def person(self, name: str) -> Person:
    for p in self.people:
      if p.name == name:
        return p
    raise KeyError(name)


def _apply(a: int, op: str, b: int) -> int:
  return a + b if op == "+" else a - b if op == "-" else a * b


@functools.lru_cache(maxsize=4)
def build_world(seed: int = WORLD_SEED) -> World:
  """The deterministic world for `seed` (cached: it is immutable)."""
  rng = np.random.default_rng([seed, 1000])
  people = []
  for name in NAMES:
    people.append(Person(
        name=name, city=CITIES[rng.integers(len(CITIES))],
        colour=COLOURS[rng.integers(len(COLOURS))], pet=PETS[rng.integers(len(PETS))],
        age=int(AGES[rng.integers(len(AGES))]), job=JOBS[rng.integers(len(JOBS))]))
  # Subtraction keeps a >= b so every answer is a non-negative integer.
  problems = tuple((a, op, b, _apply(a, op, b)) for op in OPS
                   for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)
                   if op != "-" or a >= b)
  n_eval = int(len(problems) * _EVAL_ARITH_FRACTION)
  eval_problems = tuple(sorted(int(i) for i in rng.permutation(len(problems))[:n_eval]))
  return World(people=tuple(people), problems=problems, eval_problems=eval_problems)


def _check_split(split: str) -> int:
  if split not in _SPLIT_IDS:
    raise ConfigError(f"unknown synthetic split {split!r}: use 'train' or 'eval'")
  return _SPLIT_IDS[split]


def _rng(split: str, seed: int, purpose: int) -> np.random.Generator:
  return np.random.default_rng([seed, _check_split(split), purpose])


def _pick(rng: np.random.Generator, seq):
  return seq[int(rng.integers(len(seq)))]


def _person_sentences(rng, person: Person, count: int) -> list[str]:
  attrs = [ATTRIBUTES[i] for i in rng.permutation(len(ATTRIBUTES))[:count]]
  return [_pick(rng, _STATEMENTS[a]).format(name=person.name, v=person.value(a)) for a in attrs]


def _arith_sentence(rng, world: World) -> str:
  a, op, b, c = _pick(rng, world.problems)
  # The symbolic form is the one the question stages use, so it dominates.
  templates = _ARITH_STATEMENTS[op]
  template = templates[0] if rng.random() < 0.6 else _pick(rng, templates[1:])
  return template.format(a=a, b=b, c=c)


def _qa_sentences(rng, person: Person, count: int) -> list[str]:
  # FAQ-style text, as on the web: questions in the *train* phrasings only, so the held-out
  # phrasings stay unseen until the eval.
  attrs = [ATTRIBUTES[i] for i in rng.permutation(len(ATTRIBUTES))[:count]]
  return [f"Q: {_pick(rng, _QUESTIONS['train'][a]).format(name=person.name)} "
          f"A: {person.value(a)}." for a in attrs]


def _document(rng, world: World) -> str:
  kind = rng.random()
  faq, profile, several = _DOC_MIX
  if kind < faq:  # questions and answers about one person
    sents = _qa_sentences(rng, _pick(rng, world.people), int(rng.integers(2, 5)))
  elif kind < faq + profile:  # a profile of one person
    sents = _person_sentences(rng, _pick(rng, world.people), int(rng.integers(2, 6)))
  elif kind < faq + profile + several:  # facts about several people, interleaved
    sents = []
    for _ in range(int(rng.integers(2, 4))):
      sents += _person_sentences(rng, _pick(rng, world.people), int(rng.integers(1, 3)))
  else:  # arithmetic
    sents = [_arith_sentence(rng, world) for _ in range(int(rng.integers(3, 7)))]
  return " ".join(sents)


@functools.lru_cache(maxsize=8)
def _documents(split: str, num: int, seed: int) -> tuple[str, ...]:
  rng = _rng(split, seed, purpose=1)
  world = build_world()
  exclude = frozenset(_documents("train", _DEFAULT_DOCS["train"], seed)) if split == "eval" else ()
  docs = []
  while len(docs) < num:
    doc = _document(rng, world)
    if doc not in exclude:  # eval texts never appear verbatim in the default train split
      docs.append(doc)
  return tuple(docs)


def pretraining_documents(split: str, num_documents: int | None = None,
                          seed: int = 0) -> list[str]:
  """Templated documents stating facts of the world ('train': 20000, 'eval': 500 by default).

  Eval documents state the same facts in other combinations and phrasing orders, and none
  equals a document of the default-size train split with the same seed.
  """
  _check_split(split)
  num = _DEFAULT_DOCS[split] if num_documents is None else num_documents
  if num < 0:
    raise ConfigError(f"num_documents must be non-negative, got {num}")
  return list(_documents(split, num, seed))


def _qa_candidates(split: str) -> tuple[list[dict], list[dict]]:
  """All (person questions, arithmetic questions) of a split, in a fixed order."""
  world = build_world()
  templates = _QUESTIONS[split]
  people = [{"question": q.format(name=p.name), "answer": p.value(a), "attribute": a}
            for p in world.people for a in ATTRIBUTES for q in templates[a]]
  held_out = set(world.eval_problems)
  arith = [{"question": q.format(a=a, op=op, b=b), "answer": str(c), "attribute": "arith"}
           for i, (a, op, b, c) in enumerate(world.problems)
           if (i in held_out) == (split == "eval") for q in templates["arith"]]
  return people, arith


def qa_pairs(split: str, num: int | None = None, seed: int = 0) -> list[dict]:
  """Question/answer dicts (keys 'question', 'answer', 'attribute') for SFT.

  About 60% ask about people, the rest arithmetic. 'eval' uses question phrasings never used
  in 'train', and arithmetic problems held out of 'train' questions (though stated in the
  pretraining documents). Without replacement: `num` is capped by the candidates available.
  """
  _check_split(split)
  num = _DEFAULT_QA[split] if num is None else num
  people, arith = _qa_candidates(split)
  if num > len(people) + len(arith):
    raise ConfigError(f"qa_pairs({split!r}) has only {len(people) + len(arith)} distinct "
                      f"questions, asked for num={num}: lower num")
  rng = _rng(split, seed, purpose=2)
  n_people = min(len(people), round(num * 0.6))
  n_arith = num - n_people
  if n_arith > len(arith):
    n_arith, n_people = len(arith), num - len(arith)
  chosen = ([people[i] for i in rng.permutation(len(people))[:n_people]]
            + [arith[i] for i in rng.permutation(len(arith))[:n_arith]])
  return [dict(chosen[i]) for i in rng.permutation(len(chosen))]


def _wrong_answer(rng, pair: dict) -> str:
  """Half the time a plausible wrong answer (another value of the attribute, arithmetic off by
  1-3), else a confused one (an answer to another kind of question, or a number far off):
  a reward model trained on both prefers the truth to what a drifting policy says, not only
  to near misses (PPO against one trained on near misses alone learns to answer '88')."""
  attribute, right = pair["attribute"], str(pair["answer"])
  if rng.random() < 0.5:
    if attribute == "arith":
      delta = int(rng.integers(1, 4)) * (1 if rng.random() < 0.5 else -1)
      value = int(right)
      return str(value + delta if value + delta >= 0 else value + abs(delta))
    return _pick(rng, [str(v) for v in _VALUES[attribute] if str(v) != right])
  if rng.random() < 0.5 and right.isdigit():
    return str(int(right) + int(rng.integers(5, 60)))
  others = [str(v) for a, values in _VALUES.items() if a != attribute for v in values]
  return _pick(rng, [v for v in others if v != right])


def preference_pairs(split: str, num: int | None = None, seed: int = 0) -> list[dict]:
  """Dicts with 'prompt', 'chosen' (the true answer) and 'rejected' (a wrong one: half of them
  plausible, another value of the same attribute or arithmetic off by 1-3; half confused, an
  answer of another kind or a number far off)."""
  rng = _rng(split, seed, purpose=3)
  return [{"prompt": p["question"], "chosen": p["answer"], "rejected": _wrong_answer(rng, p)}
          for p in qa_pairs(split, num, seed)]


def arithmetic_problems(split: str, num: int | None = None, seed: int = 0) -> list[dict]:
  """Dicts with 'question' ("What is 7 + 5?") and integer 'answer'; 'eval' problems are held
  out of 'train'. Sampled with replacement, so any `num` works."""
  _check_split(split)
  num = _DEFAULT_ARITH[split] if num is None else num
  world = build_world()
  held_out = set(world.eval_problems)
  pool = [p for i, p in enumerate(world.problems) if (i in held_out) == (split == "eval")]
  rng = _rng(split, seed, purpose=4)
  out = []
  for i in rng.integers(len(pool), size=num):
    a, op, b, c = pool[int(i)]
    out.append({"question": f"What is {a} {op} {b}?", "answer": c})
  return out


# A number, not glued to a preceding word/number ("7-5" is 7 and 5, not 7 and -5).
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?|(?<=\w)\d+(?:\.\d+)?")
_MARKER = re.compile(r"(?:answer\s*(?:is|:|=)|####|\\boxed\{)", re.IGNORECASE)


def _parse_int(token: str) -> int | None:
  token = token.replace(",", "")
  if "." in token:
    whole, frac = token.split(".")
    if frac.strip("0"):
      return None  # 12.5 is not an integer answer
    token = whole
  return int(token)


def check_answer(problem_answer: int, completion: str) -> bool:
  """Whether `completion` answers `problem_answer`.

  Uses the first number after the last answer marker ("answer:", "answer is", "####",
  "\\boxed{"), else the last number in the completion. Non-integers never match.
  """
  markers = list(_MARKER.finditer(completion))
  if markers:
    match = _NUMBER.search(completion, markers[-1].end())
    if match:
      return _parse_int(match.group()) == problem_answer
  numbers = _NUMBER.findall(completion)
  return bool(numbers) and _parse_int(numbers[-1]) == problem_answer


# ---- Multi-step word problems (SFT format teaching, then GRPO) ----

# Each structure is a chain of operations on the running total: (op of step 1, op of step 2,
# ...); `a` starts the chain and b, c, d are the later operands. Templates name the operands
# in that order. 'eval' keeps every train structure but adds phrasings train never uses, and
# asks with operand combinations held out of train for every template, so no eval question
# text can occur in train whatever `num` is.
_REASONING_STRUCTURES = {
    "add_sub": ("+", "-"), "sub_add": ("-", "+"), "add_add": ("+", "+"),
    "sub_sub": ("-", "-"), "mul_add": ("*", "+"), "mul_sub": ("*", "-"),
    "add_sub_add": ("+", "-", "+"),
}
_REASONING_TEMPLATES = {
    "train": {
        "add_sub": ("{name} has {a} {item}. {name} gets {b} more and gives {c} away. How many "
                    "{item} does {name} have?",
                    "{name} had {a} {item}, bought {b} more, then lost {c}. How many {item} "
                    "does {name} have now?"),
        "sub_add": ("{name} has {a} {item}. {name} gives {b} away and then finds {c} more. "
                    "How many {item} does {name} have?",
                    "There are {a} {item} at {name}'s home. {b} are sold and {c} new ones "
                    "arrive. How many {item} are there now?"),
        "add_add": ("{name} has {a} {item}, gets {b} more on Monday and {c} more on Tuesday. "
                    "How many {item} does {name} have?",
                    "{name} buys {a} {item}, then {b} more, then {c} more. How many {item} "
                    "did {name} buy?"),
        "sub_sub": ("{name} has {a} {item}, sells {b} and gives {c} to a friend. How many "
                    "{item} does {name} have left?",),
        "mul_add": ("{name} buys {a} boxes with {b} {item} in each and finds {c} more. How "
                    "many {item} does {name} have?",),
        "mul_sub": ("{name} has {a} bags of {b} {item} and gives {c} away. How many {item} "
                    "does {name} have left?",),
        "add_sub_add": ("{name} has {a} {item}. {name} gets {b} more, gives {c} away and then "
                        "buys {d}. How many {item} does {name} have?",),
    },
    "eval": {
        "add_sub": ("{name} starts with {a} {item}, receives {b} more as a gift and then sells "
                    "{c}. How many {item} are left?",),
        "sub_add": ("{name} owned {a} {item}, lost {b} of them and later got {c} more. How "
                    "many {item} does {name} own now?",),
        "add_add": ("On three days {name} collects {a}, {b} and {c} {item}. How many {item} is "
                    "that in total?",),
        "mul_add": ("{name} fills {a} bags with {b} {item} each and keeps {c} more aside. How "
                    "many {item} does {name} have altogether?",),
        "add_sub_add": ("{name} begins with {a} {item}, is given {b}, loses {c} and later "
                        "finds {d}. How many {item} does {name} end with?",),
    },
}
REASONING_ITEMS = ("cats", "dogs", "owls", "rabbits", "parrots", "hamsters", "turtles",
                   "apples", "books", "coins", "stamps", "pencils")
MAX_REASONING_NUMBER = 19  # every operand, intermediate and answer is in [0, 19]
_DEFAULT_REASONING = {"train": 2000, "eval": 300}
_EVAL_REASONING_FRACTION = 0.2


@functools.lru_cache(maxsize=1)
def _reasoning_combos() -> dict[str, tuple[tuple[tuple[int, ...], ...], ...]]:
  """Per structure, (train, eval) operand tuples: all whose every step stays in
  [0, MAX_REASONING_NUMBER] ([0, 9] for three steps), a fixed fifth held out for eval."""
  out = {}
  for k, (name, ops) in enumerate(_REASONING_STRUCTURES.items()):
    # Three steps of two-digit numbers would take ~40 tokens of solution: single digits.
    top = MAX_REASONING_NUMBER if len(ops) < 3 else 9
    # Later operands are single digits (short solutions); a product's factors are 2-5.
    first = range(2, 6) if ops[0] == "*" else range(1, top + 1)
    later = [range(2, 6) if (i == 0 and ops[0] == "*") else range(1, 10)
             for i in range(len(ops))]
    combos = []
    for a in first:
      for rest in np.ndindex(*[len(r) for r in later]):
        operands = (a,) + tuple(later[i][j] for i, j in enumerate(rest))
        if all(0 <= s[3] <= top for s in _chain(operands, ops)):
          combos.append(operands)
    rng = np.random.default_rng([WORLD_SEED, 2000, k])
    held = set(rng.permutation(len(combos))[:int(len(combos) * _EVAL_REASONING_FRACTION)]
               .tolist())
    out[name] = (tuple(c for i, c in enumerate(combos) if i not in held),
                 tuple(c for i, c in enumerate(combos) if i in held))
  return out


def _chain(operands: tuple[int, ...], ops: tuple[str, ...]) -> list[tuple[int, str, int, int]]:
  """The steps (left, op, right, result) of applying `ops` left to right."""
  steps, total = [], operands[0]
  for op, b in zip(ops, operands[1:]):
    result = _apply(total, op, b)
    steps.append((total, op, b, result))
    total = result
  return steps


def reasoning_solution(steps: list[tuple[int, str, int, int]]) -> str:
  """The worked solution of `steps`: one `a op b = c.` per step, then `#### answer`."""
  work = " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in steps)
  return f"{work}\n#### {steps[-1][3]}"


def reasoning_problems(split: str, num: int | None = None, seed: int = 0) -> list[dict]:
  """Two- and three-step arithmetic word problems about the world's people.

  Dicts with 'question' ("Alice has 3 cats. Alice gets 4 more and gives 2 away. How many
  cats does Alice have?"), integer 'answer', 'solution' ("3 + 4 = 7. 7 - 2 = 5.\\n#### 5"),
  'steps' (the (left, op, right, result) tuples the solution states), 'structure' and
  'held_out_template' (True for an eval-only phrasing). Every number is in [0, 19] (in
  [0, 9] for three-step problems), so a solution is under 40 tokens even at 512 pieces.
  'train' (2000 by default) uses the train phrasings and operand combinations; 'eval' (300)
  asks half its questions with eval-only phrasings and all with held-out combinations, so no
  eval question occurs in train. Questions within a split are distinct.
  """
  _check_split(split)
  num = _DEFAULT_REASONING[split] if num is None else num
  if num < 0:
    raise ConfigError(f"reasoning_problems num must be non-negative, got {num}")
  combos = _reasoning_combos()
  side = _SPLIT_IDS[split]
  names = [p.name for p in build_world().people]
  own = [(s, t, split == "eval") for s, ts in _REASONING_TEMPLATES[split].items() for t in ts]
  shared = ([(s, t, False) for s, ts in _REASONING_TEMPLATES["train"].items() for t in ts]
            if split == "eval" else [])
  rng = _rng(split, seed, purpose=5)
  out, seen = [], set()
  attempts = 0
  while len(out) < num:
    attempts += 1
    if attempts > 20 * num + 1000:  # the candidate space is ~10^6 per split
      raise ConfigError(f"reasoning_problems({split!r}) could not draw {num} distinct "
                        "questions: lower num")
    # 'eval' draws half its questions from eval-only phrasings, half from train phrasings.
    pool = shared if shared and rng.random() < 0.5 else own
    structure, template, held_out = pool[int(rng.integers(len(pool)))]
    operands = _pick(rng, combos[structure][side])
    steps = _chain(operands, _REASONING_STRUCTURES[structure])
    question = template.format(name=_pick(rng, names), item=_pick(rng, REASONING_ITEMS),
                               **dict(zip("abcd", operands)))
    if question in seen:
      continue
    seen.add(question)
    out.append({"question": question, "answer": steps[-1][3],
                "solution": reasoning_solution(steps), "steps": steps,
                "structure": structure, "held_out_template": held_out})
  return out
