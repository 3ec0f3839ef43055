"""gin files and bindings from absl flags: `--gin_file`, `--gin_bindings`, `--gin.NAME=VALUE`."""

from __future__ import annotations

import os
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
  import llmjax.parallel.mesh  # noqa: F401  (registers every configurable before parsing)
  import llmjax.stages  # noqa: F401
  gin.clear_config()
  for root in (os.getcwd(), REPO_ROOT):
    gin.add_config_file_search_path(root)
  files = [_resolve(f) for f in (files or [DEFAULT_GIN_FILE])]
  try:
    gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=False)
  except (ValueError, SyntaxError, IOError) as e:
    raise ConfigError(f"gin config: {e}") from None


def argv_with_gin_shorthand(argv: Sequence[str] | None = None) -> list[str]:
  """argv for absl with the shorthand moved into `--gin_bindings`."""
  rest, bindings = split_gin_shorthand(list(sys.argv if argv is None else argv))
  return rest + [f"--gin_bindings={b}" for b in bindings]
