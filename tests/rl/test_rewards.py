"""Built-in rewards: final-answer extraction on tricky strings, format, length, name lookup."""

import os

import pytest

from llmjax.data import synthetic
from llmjax.errors import ConfigError, DataError
from llmjax.rl import rewards as R

# (completion, reference, expected reward)
CASES = [
    ("So she has 72 apples.", 72, 1.0),
    ("Total: 1,234 people.", "1234", 1.0),
    ("It costs $18.", 18, 1.0),
    ("He pays $1,234.50 in total.", 1234.5, 1.0),
    ("The answer is 12 dollars", "#### 12", 1.0),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "... #### 72", 1.0),
    ("#### 1,000", "#### 1000", 1.0),
    (r"Therefore the final answer is $\boxed{42}$.", 42, 1.0),
    (r"\boxed{\frac{3}{4}}", 0.75, 1.0),
    (r"\boxed{1{,}000}", 1000, 1.0),
    (r"\boxed{\$18}", 18, 1.0),
    (r"\boxed{18\text{ dollars}}", 18, 1.0),
    # Several markers: the last one wins, whatever its kind.
    ("The answer is 5. Wait, recheck: the answer is 6.", 6, 1.0),
    ("The answer is 5. Wait, recheck: the answer is 6.", 5, 0.0),
    (r"#### 5 ... on reflection \boxed{6}", 6, 1.0),
    (r"\boxed{6} ... so #### 5", 5, 1.0),
    # The marker beats a later stray number.
    ("The answer is 7. (I checked 3 times.)", 7, 1.0),
    ("The temperature fell to -5 degrees.", -5, 1.0),
    ("The answer is \u22127", -7, 1.0),
    ("x = -3", 3, 0.0),
    ("10-3=7", 7, 1.0),
    ("pages 3-5", 5, 1.0),
    ("She ate 3/4 of the pie.", 0.75, 1.0),
    ("She ate 3/4 of the pie.", "3/4", 1.0),
    ("Half is 0.5", "1/2", 1.0),
    ("Half is .5", 0.5, 1.0),
    ("The answer is 12.0", 12, 1.0),
    ("The answer is 12", "12.0", 1.0),
    ("The answer is 12.50", 12.5, 1.0),
    ("The answer is 12.01", 12, 0.0),
    ("About 3.14159", 3.14159, 1.0),
    ("It rose by 50%.", "50%", 1.0),
    ("I have no idea.", 0, 0.0),
    ("", 0, 0.0),
    # Code is text: never run, so its would-be value does not count.
    ("__import__('os').system('rm -rf /')", 0, 0.0),
    ("eval('6*7')", 42, 0.0),
    ("exec(\"print(6*7)\"); the answer is sum([40, 2])", 42, 0.0),
]


@pytest.mark.parametrize("completion, reference, want", CASES)
def test_math_answer(completion, reference, want):
  assert R.math_answer(completion, reference) == want


def test_code_in_completion_is_not_run(tmp_path):
  marker = tmp_path / "ran"
  text = f"__import__('pathlib').Path({str(marker)!r}).touch() #### 1"
  assert R.math_answer(text, 1) == 1.0  # the '#### 1' is read; the code before it is text
  assert not os.path.exists(marker)


def test_reference_number():
  assert R.reference_number("Natalia sold 48 clips.\n#### 72") == 72.0
  assert R.reference_number("#### 1,000") == 1000.0
  assert R.reference_number(" -3.5 ") == -3.5
  assert R.reference_number("$1,000") == 1000.0
  assert R.reference_number("3/4") == 0.75
  assert R.reference_number(r"\frac{3}{4}") == 0.75
  assert R.reference_number(r"\boxed{12}") == 12.0
  assert R.reference_number("12 apples") == 12.0
  assert R.reference_number(7) == 7.0
  for bad in ("", "abc", "72 or 73", "#### ", "1/0", r"\boxed{x+1}", float("nan"), None, True):
    assert R.reference_number(bad) is None, bad


def test_unparsable_reference_raises():
  with pytest.raises(DataError, match="'seventy' is not a number"):
    R.math_answer("72", "seventy")


def test_superset_of_synthetic_check_answer():
  for completion, answer in [("answer: 12", 12), ("#### 7", 7), ("the answer is 3 then 4", 3),
                             (r"\boxed{9}", 9), ("1 2 3", 3), ("nothing", 5)]:
    assert R.math_answer(completion, answer) == float(synthetic.check_answer(answer, completion))


def test_format_reward():
  good = "First 3 + 4 = 7.\nThen double it.\n#### 14"
  assert R.format_reward(good) == 1.0
  assert R.format_reward("Reasoning here.\nThe answer is 14.") == 1.0
  assert R.format_reward("#### 14") == 0.0  # no reasoning before the answer line
  assert R.format_reward("Reasoning.\n#### 14\nand then more text") == 0.0
  assert R.format_reward("<think>x</think>y", r"(?s)^<think>(?!.*<think>).*?</think>.*$") == 1.0
  with pytest.raises(ConfigError, match="not a valid regular expression"):
    R.format_reward("x", "(")


def test_length_penalty():
  assert R.length_penalty(50, 100) == pytest.approx(-0.5)
  assert R.length_penalty(150, 100) == -1.0
  assert R.length_penalty(70, 100, free_tokens=80) == 0.0
  assert R.length_penalty(90, 100, free_tokens=80, scale=0.5) == pytest.approx(-0.25)
  with pytest.raises(ConfigError, match="free_tokens"):
    R.length_penalty(1, 100, free_tokens=100)
  with pytest.raises(ConfigError, match="max_tokens"):
    R.length_penalty(1, 0)


def test_resolve_reward():
  assert R.resolve_reward("math_answer") is R.math_answer
  assert R.resolve_reward("llmjax.rl.rewards.length_penalty") is R.length_penalty
  with pytest.raises(ConfigError, match="format, length_penalty, math_answer"):
    R.resolve_reward("accuracy")
  with pytest.raises(ConfigError, match="does not import"):
    R.resolve_reward("no_such_module_xyz.reward")
  with pytest.raises(ConfigError, match="no callable 'nope'"):
    R.resolve_reward("llmjax.rl.rewards.nope")


@pytest.mark.parametrize("completion,reference,expected", [
    ("Green.", "green", 1.0), ("  a Horse ", "a horse", 1.0), ("a horse", "a cat", 0.0),
    ("The answer is 36", 36.0, 1.0), ("#### 35", 36.0, 0.0), ("47", "47", 1.0)])
def test_reference_match_reads_text_and_numbers(completion, reference, expected):
  assert R.reference_match(completion, reference) == expected
