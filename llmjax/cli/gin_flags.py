"""gin files and bindings from absl flags: `--gin_file`, `--gin_bindings`, `--gin.NAME=VALUE`."""

from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Sequence

import gin
from absl import flags

from llmjax.errors import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_GIN_FILE = "experiments/tiny/pretrain.gin"

flags.DEFINE_multi_string("gin_file", [], "gin experiment file(s), applied in order.")
flags.DEFINE_multi_string("gin_bindings", [], "gin bindings, e.g. 'TrainConfig.total_steps=100'.")


def split_gin_shorthand(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Pulls `--gin.NAME=VALUE` out of argv: (remaining argv, bindings `NAME = VALUE`).

  absl would reject these as unknown flags, so they are removed before it parses. A VALUE that
  is not a gin literal (a bare path or word) is taken as a string, so `--gin.X=/tmp/a` works.
  """
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      name, value = arg[len("--gin."):].split("=", 1)
      bindings.append(f"{name} = {_as_gin_literal(value)}")
    else:
      rest.append(arg)
  return rest, bindings


def _as_gin_literal(value: str) -> str:
  if value.startswith(("@", "%")):
    # A configurable reference or macro: parse_value cannot read one whose module is not
    # imported yet (this runs before the stages register theirs), and it is never a path.
    return value
  try:
    gin.config.parse_value(value)
    return value
  except (SyntaxError, ValueError):
    return repr(value)


def _resolve(path: str) -> str:
  for candidate in (path, os.path.join(REPO_ROOT, path)):
    if os.path.exists(candidate):
      return candidate
  raise ConfigError(f"gin file {path!r} not found (looked in the current directory and in "
                    f"{REPO_ROOT})")


def parse_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses the experiment; unknown configurables or parameters fail here, naming the line."""
  # Registers every configurable before parsing (SweepConfig: llmjax-scaling sweep's).
  import llmjax.parallel.mesh  # noqa: F401
  import llmjax.scaling.sweep  # noqa: F401
  import llmjax.stages  # noqa: F401
  gin.clear_config()
  for root in (os.getcwd(), REPO_ROOT):
    gin.add_config_file_search_path(root)
  files = [_resolve(f) for f in (files or [DEFAULT_GIN_FILE])]
  try:
    gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=False)
  except (ValueError, SyntaxError, IOError) as e:
    raise ConfigError(f"gin config: {e}") from None
  check_macros_are_read(bindings)


# `NAME = ...` (optionally `scope/NAME`) at the start of a binding line: a macro, since a
# parameter binding has a dot (`Configurable.param = ...`).
_MACRO_BINDING = re.compile(r"^\s*((?:[\w.]+/)*[A-Za-z_]\w*)\s*=", re.MULTILINE)
_MACRO_REFERENCE = re.compile(r"%((?:[\w.]+/)*[A-Za-z_][\w.]*)")
_PARAMETER_BINDING = re.compile(r"^(?:[\w.]+/)*([\w.]+)\.(\w+)\s*=", re.MULTILINE)


def check_macros_are_read(bindings: Sequence[str]) -> None:
  """Fails when a binding sets a macro that no parsed file or binding reads (`%NAME`).

  gin accepts any `NAME = VALUE` as a macro definition, so a misspelled `--gin.TOTAL_STEP=100`
  would otherwise be ignored and the run would train with the file's value.
  """
  bound = [m for b in bindings for m in _MACRO_BINDING.findall(b)]
  if not bound:
    return
  config = gin.config_str()  # the parsed config, macro references written `%NAME`
  read = {m for m in _MACRO_REFERENCE.findall(config) if not m.startswith("gin.")}  # REQUIRED
  for name in bound:
    if name in read:
      continue
    raise ConfigError(f"gin binding {name!r}: the experiment reads no macro (%NAME) or "
                      f"parameter of that name, so the value would be ignored."
                      f"{_closest(name, read, config)} Set a macro by the name the gin file "
                      "reads, a parameter as --gin.Configurable.param=VALUE.")


def _closest(name: str, macros: set[str], config: str) -> str:
  # Case-insensitive, and against a parameter's own name too: `--gin.total_steps=5` should
  # point at `TrainConfig.total_steps` (or `TOTAL_STEPS`), not at nothing.
  candidates = {m.lower(): m for m in macros}
  for configurable, param in _PARAMETER_BINDING.findall(config):
    full = f"{configurable}.{param}"
    candidates.setdefault(param.lower(), full)
    candidates.setdefault(full.lower(), full)
  match = difflib.get_close_matches(name.lower(), list(candidates), n=1, cutoff=0.6)
  return f" Did you mean {candidates[match[0]]!r}?" if match else ""


def argv_with_gin_shorthand(argv: Sequence[str] | None = None) -> list[str]:
  """argv for absl with the shorthand moved into `--gin_bindings`."""
  rest, bindings = split_gin_shorthand(list(sys.argv if argv is None else argv))
  return rest + [f"--gin_bindings={b}" for b in bindings]
