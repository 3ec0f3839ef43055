"""Built-in reward functions: math answers, output format and length, in plain Python.

Rewards are read off the completion's text with regular expressions only: model output is
never evaluated, imported or executed, so `__import__('os')` or `eval("6*7")` in a completion
is just text (and scores 0 unless its digits happen to be the answer).

`resolve_reward` turns a configured name into a function: one of `BUILTIN_REWARDS`, or a dotted
`module.function` path to a user's own.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
from typing import Callable

from llmjax.errors import ConfigError, DataError

# A number: optional sign (ASCII or Unicode minus) and dollar sign, then digits with optional
# thousands commas (1,234,567) and decimals, or a bare decimal (.5). The lookbehind keeps the
# '-' of ranges and sums ("3-5", "10-3") from reading as a sign, and a digit or '.' before the
# match from starting a number mid-way.
_NUM = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_NUMBER = re.compile(
    rf"(?<![\w.])(?P<sign>[-\u2212])?\s?\$?\s?(?P<num>{_NUM})"
    rf"(?:\s?/\s?(?P<den>{_NUM}))?")
# LaTeX fractions: \frac{3}{4}, \dfrac{3}{4} (the brace-less \tfrac34 is not read).
_LATEX_FRAC = re.compile(
    rf"(?P<sign>[-\u2212])?\s?\\[dt]?frac\s*\{{\s*(?P<num>{_NUM})\s*\}}"
    rf"\s*\{{\s*(?P<den>{_NUM})\s*\}}")
# Final-answer markers; the last one in the completion decides. \boxed is read separately (its
# braces delimit the answer).
_MARKER = re.compile(r"####|\b(?:final\s+)?answer\s*(?:is\s*:?|:|=)|\\boxed\s*\{", re.IGNORECASE)
# LaTeX spacing and text that may sit inside \boxed{} around a number.
_LATEX_NOISE = re.compile(r"\\[,;:! ]|\\(?:text|mathrm|textbf|mbox)\s*\{[^{}]*\}|\\%|\\\$|\\left|"
                          r"\\right")

DEFAULT_ABS_TOL = 1e-6
DEFAULT_REL_TOL = 1e-6

# Reasoning (some text) then a last non-empty line that gives a final answer with a digit:
# "... \n#### 72", "...\nThe answer is 72.", "...\n\\boxed{72}".
FINAL_ANSWER_LINE = (r"\A\s*\S[\s\S]*\n[^\n]*(?:####|\\boxed\{|[Aa]nswer(?:\s+is|\s*:))[^\n]*\d"
                     r"[^\n]*\s*\Z")


def _to_float(num: str) -> float:
  return float(num.replace(",", ""))


def _match_value(m: re.Match) -> float | None:
  """The value of a `_NUMBER` / `_LATEX_FRAC` match; None for a zero denominator."""
  value = _to_float(m.group("num"))
  den = m.group("den")
  if den is not None:
    d = _to_float(den)
    if d == 0:
      return None
    value /= d
  return -value if m.group("sign") else value


def _numbers(text: str) -> list[float]:
  """The numbers in `text` in order; a LaTeX fraction is one number, not two."""
  fracs = list(_LATEX_FRAC.finditer(text))
  found = [(m.start(), _match_value(m)) for m in fracs]
  for m in _NUMBER.finditer(text):
    if not any(f.start() <= m.start() < f.end() for f in fracs):
      found.append((m.start(), _match_value(m)))
  return [v for _, v in sorted(found, key=lambda x: x[0]) if v is not None]


def _first_number(text: str) -> float | None:
  numbers = _numbers(text)
  return numbers[0] if numbers else None


def _last_number(text: str) -> float | None:
  numbers = _numbers(text)
  return numbers[-1] if numbers else None


def _clean_latex(text: str) -> str:
  """LaTeX inside \\boxed{} without the spacing, \\text{...} units and {,} separators."""
  return _LATEX_NOISE.sub(" ", text.replace("{,}", ","))


def _braced(text: str, start: int) -> str | None:
  """The text up to the brace closing one opened just before `start`; None if unclosed."""
  depth = 1
  for i in range(start, len(text)):
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return text[start:i]
  return None


def _answer_after(text: str, marker: re.Match) -> float | None:
  if marker.group().startswith("\\"):
    inner = _braced(text, marker.end())
    return None if inner is None else _first_number(_clean_latex(inner))
  # The answer is on the marker's line ("#### 72", "The answer is $1,234."), not in what follows.
  line = text[marker.end():].split("\n", 1)[0]
  return _first_number(line)


def extract_answer(completion: str) -> float | None:
  """The final numeric answer of a completion, None when it has none.

  The number after the last final-answer marker that gives one: `\\boxed{N}` (LaTeX fractions,
  `\\text{...}` units and `\\$` allowed inside), GSM8K's `#### N`, "the answer is N",
  "answer: N", "final answer: N" (case-insensitive; the number on the marker's line). Without
  such a marker, the last number in the completion. Numbers may carry a sign, `$`, thousands
  commas, decimals and a `/` fraction (`3/4`); trailing units, `%` and full stops are ignored.
  """
  markers = list(_MARKER.finditer(completion))
  for marker in reversed(markers):
    value = _answer_after(completion, marker)
    if value is not None:
      return value
  return _last_number(completion)


def reference_number(text: str | float | int) -> float | None:
  """A reference answer as a number, None when it is not one (for the loader to report).

  Reads a GSM8K answer field (`"...reasoning...\\n#### 1,234"`: the text after the last
  `####`), a `\\boxed{...}` or a plain number (`"72"`, `"-3.5"`, `"$1,000"`, `"3/4"`,
  `"\\frac{3}{4}"`, `"50%"`). Unlike a completion, the answer must be a single number and
  nothing else (a unit word is allowed after it); anything else gives None.
  """
  if isinstance(text, bool):
    return None
  if isinstance(text, (int, float)):
    return float(text) if math.isfinite(text) else None
  if not isinstance(text, str):
    return None
  if "####" in text:
    text = text.rsplit("####", 1)[1]
  boxed = re.search(r"\\boxed\s*\{", text)
  if boxed:
    inner = _braced(text, boxed.end())
    if inner is None:
      return None
    text = _clean_latex(inner)
  text = text.strip().rstrip(".").strip()
  for pattern in (_LATEX_FRAC, _NUMBER):
    m = pattern.match(text)
    # One number, optionally followed by a unit word or '%', and nothing else.
    if m and re.fullmatch(r"\s*(?:%|[A-Za-z]+)?\s*", text[m.end():]):
      return _match_value(m)
  return None


def math_answer(completion: str, reference: str | float, *, abs_tol: float = DEFAULT_ABS_TOL,
                rel_tol: float = DEFAULT_REL_TOL) -> float:
  """1.0 when the completion's final answer equals the reference number, else 0.0.

  The answer is `extract_answer(completion)`; the reference is a number or a string read by
  `reference_number` (GSM8K's `... #### 72`). They are compared as floats with
  `math.isclose(abs_tol, rel_tol)`, so "12.0", "$12" and "12 apples" all answer 12, and "3/4"
  answers 0.75. A superset of `llmjax.data.synthetic.check_answer`.

  Raises:
    DataError: the reference is not a number (validate with `reference_number` when loading).
  """
  ref = reference_number(reference)
  if ref is None:
    raise DataError(f"math_answer: the reference answer {reference!r} is not a number; "
                    f"math_answer needs numeric references (GSM8K's '#### 72', '3/4', '-2.5').")
  if not isinstance(completion, str):
    return 0.0
  answer = extract_answer(completion)
  if answer is None:
    return 0.0
  return 1.0 if math.isclose(answer, ref, rel_tol=rel_tol, abs_tol=abs_tol) else 0.0


@functools.lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern:
  try:
    return re.compile(pattern, re.MULTILINE)
  except re.error as e:
    raise ConfigError(f"format_reward: pattern {pattern!r} is not a valid regular expression "
                      f"({e}); fix it (see Python's `re` syntax).") from None


def format_reward(completion: str, pattern: str = FINAL_ANSWER_LINE) -> float:
  """1.0 when the regex `pattern` matches somewhere in the completion, else 0.0.

  `re.search` with re.MULTILINE (`^`/`$` match at line ends; use `\\A`/`\\Z` to anchor to the
  whole completion, `(?s)` to let `.` cross lines). The default, `FINAL_ANSWER_LINE`, asks for
  some reasoning and then a last line that gives a final answer with a digit (`#### 72`,
  `The answer is 72.`, `\\boxed{72}`). TRL's `think_format_reward` is
  `r"^<think>(?!.*<think>)(.*?)</think>.*$"` with re.DOTALL.
  """
  return 1.0 if _compile(pattern).search(completion) else 0.0


def length_penalty(num_tokens: int, max_tokens: int, *, free_tokens: int = 0,
                   scale: float = 1.0) -> float:
  """A reward in [-scale, 0] that grows linearly more negative with the completion's length.

    penalty = -scale * clip((num_tokens - free_tokens) / (max_tokens - free_tokens), 0, 1)

  so completions of up to `free_tokens` tokens are not penalised, and one of `max_tokens` or
  more gets -scale. With free_tokens = max_tokens - cache this is DAPO's soft overlong
  punishment (`policy_loss.soft_overlong_penalty`) inside the budget, without its -1 step past
  it.

  Args:
    num_tokens: the completion's length in tokens.
    max_tokens: the length that gets the full penalty (usually the generation budget).
    free_tokens: lengths up to this are free, in [0, max_tokens).
    scale: the largest penalty, >= 0.
  """
  if not max_tokens > 0:
    raise ConfigError(f"length_penalty: max_tokens must be > 0, got {max_tokens}.")
  if not 0 <= free_tokens < max_tokens:
    raise ConfigError(f"length_penalty: free_tokens must lie in [0, max_tokens={max_tokens}), "
                      f"got {free_tokens}.")
  if not scale >= 0:
    raise ConfigError(f"length_penalty: scale must be >= 0, got {scale}; it is the size of "
                      f"the largest penalty.")
  frac = (num_tokens - free_tokens) / (max_tokens - free_tokens)
  return -scale * min(max(frac, 0.0), 1.0)


def reference_match(completion: str, reference: str | float) -> float:
  """1.0 when a completion gives the reference answer: a number by `math_answer`, a text
  answer by exact match after `instructions.normalize_answer` (case, spaces, a final
  period). What held-out accuracy and exact match count."""
  if isinstance(reference, str):
    from llmjax.data.instructions import normalize_answer
    return float(normalize_answer(completion) == normalize_answer(reference))
  return math_answer(completion, reference)


BUILTIN_REWARDS: dict[str, Callable[..., float]] = {
    "math_answer": math_answer,
    "format": format_reward,
    "length_penalty": length_penalty,
}


def resolve_reward(name: str) -> Callable[..., float]:
  """The reward function called `name`: a key of `BUILTIN_REWARDS` or a `module.function` path.

  Raises:
    ConfigError: an unknown name (listing the built-ins), a module that does not import, or an
      attribute that is missing or not callable.
  """
  if name in BUILTIN_REWARDS:
    return BUILTIN_REWARDS[name]
  builtins = ", ".join(sorted(BUILTIN_REWARDS))
  if not isinstance(name, str) or "." not in name.strip(".") or " " in name:
    raise ConfigError(f"reward {name!r} is unknown; use a built-in ({builtins}) or a dotted "
                      f"'module.function' path to your own.")
  module_name, attr = name.rsplit(".", 1)
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ConfigError(f"reward {name!r}: module {module_name!r} does not import ({e}); check "
                      f"the path and PYTHONPATH, or use a built-in ({builtins}).") from None
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise ConfigError(f"reward {name!r}: {module_name!r} has no callable {attr!r}; name a "
                      f"function in it, or use a built-in ({builtins}).")
  return fn
