"""The synthetic world is deterministic, correct and split without leaks."""

import re

import pytest

from llmjax.data import synthetic
from llmjax.errors import ConfigError

_ARITH = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)\.")
_VERBAL = re.compile(r"(\d+) (plus|minus|times) (\d+) equals (\d+)\.")


def test_deterministic_across_calls():
  synthetic.build_world.cache_clear()
  synthetic._documents.cache_clear()
  first = synthetic.pretraining_documents("train", 300)
  synthetic.build_world.cache_clear()
  synthetic._documents.cache_clear()
  assert synthetic.pretraining_documents("train", 300) == first
  assert synthetic.qa_pairs("train") == synthetic.qa_pairs("train")
  assert synthetic.preference_pairs("eval") == synthetic.preference_pairs("eval")
  assert synthetic.arithmetic_problems("train") == synthetic.arithmetic_problems("train")


def test_golden_values():
  # Pins the generator: a change here silently changes every experiment's data.
  world = synthetic.build_world()
  assert len(world.people) == len(synthetic.NAMES) == 48
  assert world.person("Alice") == synthetic.Person(
      name="Alice", city="Oslo", colour="yellow", pet="an iguana", age=60, job="a nurse")
  assert synthetic.pretraining_documents("train", 2) == [
      "Bob's occupation: a nurse. Bob's favourite colour is black. Bob lives in Madrid.",
      "Irene earns a living as a nurse. Of all colours, Irene prefers white. Irene keeps a dog "
      "at home."]
  assert synthetic.arithmetic_problems("eval", 2) == [
      {"question": "What is 11 + 15?", "answer": 26},
      {"question": "What is 13 + 12?", "answer": 25}]
  assert synthetic.pretraining_documents("train", 3) == synthetic.pretraining_documents(
      "train")[:3]


def test_default_sizes_and_seed():
  train = synthetic.pretraining_documents("train")
  evals = synthetic.pretraining_documents("eval")
  assert (len(train), len(evals)) == (20000, 500)
  assert synthetic.pretraining_documents("train", 50, seed=1) != train[:50]
  # Another seed draws other documents from the same world.
  assert synthetic.build_world() is synthetic.build_world()


def test_train_and_eval_documents_differ():
  train = set(synthetic.pretraining_documents("train"))
  evals = synthetic.pretraining_documents("eval")
  assert not train & set(evals)
  assert len(set(evals)) > 490


def test_documents_state_true_facts():
  world = synthetic.build_world()
  n_arith = 0
  for doc in synthetic.pretraining_documents("train", 2000):
    for a, op, b, c in _ARITH.findall(doc):
      a, b, c = int(a), int(b), int(c)
      assert c == {"+": a + b, "-": a - b, "*": a * b}[op], doc
      n_arith += 1
    for a, op, b, c in _VERBAL.findall(doc):
      a, b, c = int(a), int(b), int(c)
      assert c == {"plus": a + b, "minus": a - b, "times": a * b}[op], doc
    for name, city in re.findall(r"(\w+) lives in (\w+)\.", doc):
      assert world.person(name).city == city
    for name, age in re.findall(r"(\w+) is (\d+) years old\.", doc):
      assert world.person(name).age == int(age)
    for name, job in re.findall(r"The occupation of (\w+) is ([\w ]+)\.", doc):
      assert world.person(name).job == job
  assert n_arith > 500


def test_faq_sentences_are_true_and_use_train_phrasings_only():
  world = synthetic.build_world()
  truth = {q.format(name=p.name): p.value(a) for p in world.people
           for a in synthetic.ATTRIBUTES for q in synthetic._QUESTIONS["train"][a]}
  n = 0
  for doc in synthetic.pretraining_documents("train", 2000):
    for question, answer in re.findall(r"Q: ([^?]+\?) A: ([^.]+)\.", doc):
      assert truth.get(question) == answer, (question, answer)  # unknown phrasing -> None
      n += 1
  assert n > 100


def test_qa_pairs_are_true_and_eval_phrasing_is_held_out():
  world = synthetic.build_world()
  train, evals = synthetic.qa_pairs("train"), synthetic.qa_pairs("eval")
  assert (len(train), len(evals)) == (2000, 300)
  assert all(set(p) == {"question", "answer", "attribute"} for p in train)
  assert len({p["question"] for p in train}) == len(train)  # no duplicates

  def template(q):
    return re.sub(r"\d+", "N", re.sub("|".join(synthetic.NAMES), "NAME", q))

  assert not {template(p["question"]) for p in train} & {template(p["question"]) for p in evals}
  assert not {p["question"] for p in train} & {p["question"] for p in evals}
  for p in train + evals:
    if p["attribute"] == "arith":
      a, op, b = re.search(r"(\d+) ([-+*]) (\d+)", p["question"]).groups()
      assert int(p["answer"]) == eval(f"{a}{op}{b}")  # pylint: disable=eval-used
    else:
      name = next(n for n in synthetic.NAMES if re.search(rf"\b{n}\b", p["question"]))
      assert p["answer"] == world.person(name).value(p["attribute"])
  pet = next(p for p in train if p["question"].startswith("What pet does"))
  assert pet["answer"].startswith(("a ", "an "))
  with pytest.raises(ConfigError, match="lower num"):
    synthetic.qa_pairs("eval", num=10**6)


def test_preference_pairs_reject_plausible_and_confused_wrong_answers():
  pairs = synthetic.preference_pairs("train", num=500)
  qa = synthetic.qa_pairs("train", num=500)
  assert [p["prompt"] for p in pairs] == [p["question"] for p in qa]
  kinds = {"near": 0, "far": 0}
  for p, q in zip(pairs, qa):
    assert p["chosen"] == q["answer"] and p["rejected"] != p["chosen"]
    own = set(map(str, synthetic._VALUES.get(q["attribute"], ())))
    if q["attribute"] == "arith" and p["rejected"].isdigit():
      near = abs(int(p["rejected"]) - int(p["chosen"])) <= 3
    else:
      near = p["rejected"] in own
    kinds["near" if near else "far"] += 1
  # Half plausible near misses, half confused answers (another kind, or far off).
  assert 200 < kinds["near"] < 300 and 200 < kinds["far"] < 300


def test_arithmetic_problems_held_out():
  train = synthetic.arithmetic_problems("train", num=3000)
  evals = synthetic.arithmetic_problems("eval")
  assert len(evals) == 200 and isinstance(evals[0]["answer"], int)
  assert not {p["question"] for p in train} & {p["question"] for p in evals}
  for p in train[:200] + evals:
    a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", p["question"]).groups()
    assert p["answer"] == eval(f"{a}{op}{b}") >= 0  # pylint: disable=eval-used


@pytest.mark.parametrize("completion,expected", [
    ("12", True),
    ("The answer is 12.", True),
    ("7 + 5 = 12", True),
    ("Answer: 12. Check: 7 + 5 = 12", True),
    ("Answer: 12, since 5 + 7 makes 12 and not 13", True),
    ("First 7 + 5 = 13? No. The answer is12", True),
    ("#### 12", True),
    ("\\boxed{12}", True),
    ("answer: 13", False),
    ("12 is wrong, the answer: 13", False),
    ("7 + 5 = 13", False),
    ("112", False),
    ("12.5", False),
    ("12.0", True),
    ("twelve", False),
    ("", False),
    ("answer: -", False),
])
def test_check_answer(completion, expected):
  assert synthetic.check_answer(12, completion) is expected


def test_check_answer_negative_and_glued():
  assert synthetic.check_answer(-3, "answer: -3")
  assert synthetic.check_answer(2, "7-5=2")
  assert not synthetic.check_answer(-5, "7-5")
  assert synthetic.check_answer(1200, "The answer is 1,200.")


def test_bad_split():
  with pytest.raises(ConfigError, match="'train' or 'eval'"):
    synthetic.pretraining_documents("test")


# ---- Multi-step word problems ----

def test_reasoning_problems_deterministic_and_sized():
  synthetic._reasoning_combos.cache_clear()
  first = synthetic.reasoning_problems("train")
  synthetic._reasoning_combos.cache_clear()
  assert synthetic.reasoning_problems("train") == first
  assert len(first) == 2000 and len(synthetic.reasoning_problems("eval")) == 300
  assert synthetic.reasoning_problems("train", 5) == first[:5]
  assert synthetic.reasoning_problems("train", 50, seed=1) != first[:50]
  assert len({p["question"] for p in first}) == len(first)
  # Pins the generator: a change here silently changes every RL experiment's data.
  assert synthetic.reasoning_problems("train", 1) == [{
      "question": "Grace has 5 bags of 3 owls and gives 4 away. How many owls does Grace "
                  "have left?",
      "answer": 11, "solution": "5 * 3 = 15. 15 - 4 = 11.\n#### 11",
      "steps": [(5, "*", 3, 15), (15, "-", 4, 11)], "structure": "mul_sub",
      "held_out_template": False}]


def test_reasoning_answers_follow_from_the_question_numbers():
  for split in ("train", "eval"):
    for p in synthetic.reasoning_problems(split):
      steps = p["steps"]
      assert 2 <= len(steps) <= 3
      for (a, op, b, c), nxt in zip(steps, steps[1:] + [None]):
        assert c == eval(f"{a}{op}{b}")  # pylint: disable=eval-used
        assert 0 <= min(a, b, c) and max(a, b, c) < 20
        if nxt is not None:
          assert nxt[0] == c  # each step continues from the last result
      assert p["answer"] == steps[-1][3]
      # The question states exactly the operands, in order.
      operands = [steps[0][0]] + [s[2] for s in steps]
      assert [int(n) for n in re.findall(r"\d+", p["question"])] == operands
      work, final = p["solution"].split("\n")
      assert final == f"#### {p['answer']}"
      assert work == " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in steps)
      assert synthetic.check_answer(p["answer"], p["solution"])


def test_reasoning_eval_is_held_out():
  train = synthetic.reasoning_problems("train", 5000)
  evals = synthetic.reasoning_problems("eval")
  assert not {p["question"] for p in train} & {p["question"] for p in evals}
  assert not any(p["held_out_template"] for p in train)
  held = [p for p in evals if p["held_out_template"]]
  assert 0.3 < len(held) / len(evals) < 0.7
  # A held-out phrasing's fixed words (numbers, names and items masked) never occur in train.
  def shape(p):
    text = re.sub(r"\d+", "N", p["question"])
    for name in synthetic.NAMES:
      text = text.replace(name, "X")
    for item in synthetic.REASONING_ITEMS:
      text = text.replace(item, "I")
    return text
  train_shapes = {shape(p) for p in train}
  assert not {shape(p) for p in held} & train_shapes
  assert {shape(p) for p in evals if not p["held_out_template"]} <= train_shapes
  # Operand combinations are held out per structure.
  combos = lambda ps: {(p["structure"], p["steps"][0][0]) + tuple(s[2] for s in p["steps"])
                       for p in ps}
  assert not combos(train) & combos(evals)


def test_reasoning_solutions_are_short(tokenizer):
  problems = synthetic.reasoning_problems("train") + synthetic.reasoning_problems("eval")
  solution = max(len(tokenizer.encode(p["solution"])) for p in problems)
  question = max(len(tokenizer.encode(p["question"])) for p in problems)
  assert solution < 40 and question < 80, (solution, question)
  with pytest.raises(ConfigError, match="non-negative"):
    synthetic.reasoning_problems("train", -1)
