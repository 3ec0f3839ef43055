"""gin files and bindings from absl flags: `--gin_file`, `--gin_bindings`, `--gin.NAME=VALUE`."""

from __future__ import annotations

import difflib
import inspect
import io
import os
import re
import sys
import tokenize
import types
import typing
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


_SEARCH_PATHS: set[str] = set()


def parse_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses the experiment; unknown configurables or parameters, syntax errors, values of the
  wrong type and undefined macros fail here as a ConfigError naming the file, line or key."""
  # Registers every configurable before parsing (SweepConfig: llmjax-scaling sweep's).
  import llmjax.parallel.mesh  # noqa: F401
  import llmjax.scaling.sweep  # noqa: F401
  import llmjax.stages  # noqa: F401
  gin.clear_config()
  for root in (os.getcwd(), REPO_ROOT):
    if root not in _SEARCH_PATHS:  # gin keeps every path added, repeats included
      gin.add_config_file_search_path(root)
      _SEARCH_PATHS.add(root)
  files = [_resolve(f) for f in (files or [DEFAULT_GIN_FILE])]
  # What gin.parse_config_files_and_bindings does, one source at a time so that an error
  # gin gives without a location (an unclosed bracket) still names its file.
  sources = [(f, lambda f=f: gin.parse_config_file(f)) for f in files]
  sources.append((None, lambda: gin.parse_config(list(bindings))))
  for file, parse in sources:
    try:
      parse()
    except tokenize.TokenError as e:
      if file:
        where = f"{file}: a bracket or quote opened before line {e.args[1][0]}"
      else:
        where = f"binding {next((b for b in bindings if _unclosed(b)), bindings[-1])!r}: a " \
                "bracket or quote"
      raise ConfigError(f"gin config: {where} is never closed: close it") from None
    except (ValueError, SyntaxError, IOError) as e:
      raise ConfigError(f"gin config: {_one_line_location(str(e))}"
                        f"{_parameter_suggestion(str(e))}") from None
  check_macros_are_read(bindings)
  check_binding_types()


def _unclosed(text: str) -> bool:
  try:
    list(tokenize.generate_tokens(io.StringIO(text).readline))
    return False
  except tokenize.TokenError:
    return True


# gin's location suffix: `\n  In file "F", line N\n    TEXT` (or `In bindings string line N`),
# then a caret line when it points at a column.
_GIN_LOCATION = re.compile(r'\n\s*In (?:file "(?P<file>[^"]*)", line (?P<line>\d+)|'
                           r'bindings string line \d+)\n(?P<text>[^\n]*)(?:\n\s*\^)?')


def _one_line_location(message: str) -> str:
  def located(m: re.Match) -> str:
    where = f"{m['file']}:{m['line']}" if m["file"] else "binding"
    return f" ({where}: {m['text'].strip()})"
  return _GIN_LOCATION.sub(located, message)


_UNKNOWN_PARAMETER = re.compile(
    r"Configurable '([\w./]+)' doesn't have a parameter named '(\w+)'")


def _parameter_suggestion(message: str) -> str:
  """For gin's unknown-parameter error, the parameters the configurable has."""
  m = _UNKNOWN_PARAMETER.search(message)
  if not m:
    return ""
  try:
    names = list(inspect.signature(inspect.unwrap(gin.get_configurable(m[1]))).parameters)
  except (ValueError, TypeError):
    return ""
  close = difflib.get_close_matches(m[2], names, n=1, cutoff=0.6)
  if close:
    return f" Did you mean {m[1]}.{close[0]}?"
  return f" Its parameters: {', '.join(names)}."


# `NAME = ...` (optionally `scope/NAME`) at the start of a binding line: a macro, since a
# parameter binding has a dot (`Configurable.param = ...`).
_MACRO_BINDING = re.compile(r"^\s*((?:[\w.]+/)*[A-Za-z_]\w*)\s*=", re.MULTILINE)
_MACRO_REFERENCE = re.compile(r"%((?:[\w.]+/)*[A-Za-z_][\w.]*)")
# `[scope/]Configurable.param = ...`: (scope/, configurable, param) of a parameter binding.
_PARAMETER_BINDING = re.compile(r"^((?:[\w.]+/)*)([\w.]+)\.(\w+)\s*=", re.MULTILINE)


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
  for _, configurable, param in _PARAMETER_BINDING.findall(config):
    full = f"{configurable}.{param}"
    candidates.setdefault(param.lower(), full)
    candidates.setdefault(full.lower(), full)
  match = difflib.get_close_matches(name.lower(), list(candidates), n=1, cutoff=0.6)
  return f" Did you mean {candidates[match[0]]!r}?" if match else ""


# What a bound literal may be for a parameter annotated with these types (a float takes an int).
_LITERAL_TYPES = {int: (int,), float: (int, float), str: (str,), bool: (bool,),
                  type(None): (type(None),)}


def check_binding_types() -> None:
  """Fails when a bound value is not of its parameter's annotated type, or reads an
  undefined macro.

  gin hands any literal through, so `TrainConfig.total_steps = 'ten'` would otherwise fail
  deep inside the configurable with a TypeError that names neither the binding nor the fix
  (and `DataConfig.batch_size = 2.5` only once training starts). Only plain annotations
  (int, float, str, bool, optionally None) are checked; containers and configs are not.
  """
  config = gin.config_str()
  for scope, configurable, param in _PARAMETER_BINDING.findall(config):
    key = f"{scope}{configurable}.{param}"
    try:
      value, where = gin.query_parameter(key), key
    except ValueError:  # not a binding gin can look up (a constant): not checked
      continue
    while isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro":
      macro = value.scoped_selector.rsplit("/", 1)[0]
      where = macro
      try:
        value = gin.query_parameter(f"{macro}/gin.macro.value")
      except ValueError:
        defined = set(_MACRO_BINDING.findall(config))
        raise ConfigError(f"gin binding {key} = %{macro}: no macro {macro} is defined."
                          f"{_closest(macro, defined, '')} Define it ({macro} = VALUE) or "
                          "fix the name.") from None
    annotation = _plain_annotation(configurable, param)
    if annotation is None or value is gin.REQUIRED or isinstance(
        value, gin.config.ConfigurableReference):
      continue
    allowed = tuple(t for option in annotation for t in _LITERAL_TYPES[option])
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
      names = " or ".join("None" if t is type(None) else t.__name__ for t in annotation)
      via = f" (via %{where})" if where != key else ""
      raise ConfigError(f"gin binding {key} = {value!r}{via}: {configurable}.{param} takes "
                        f"{names}, not {type(value).__name__}: fix it in the gin file or "
                        f"override it with --gin.{where}=VALUE")


def _plain_annotation(configurable: str, param: str) -> tuple[type, ...] | None:
  """The types of a parameter's annotation when all are plain literals (int, float, str,
  bool, None); None for anything else (containers, configs) or when unknown."""
  try:
    target = inspect.unwrap(gin.get_configurable(configurable))
    hint = typing.get_type_hints(target)[param]
  except Exception:  # pylint: disable=broad-except  # unresolvable annotation: not checked
    return None
  union = typing.get_origin(hint) in (typing.Union, types.UnionType)
  options = typing.get_args(hint) if union else (hint,)
  return options if all(o in _LITERAL_TYPES for o in options) else None


def argv_with_gin_shorthand(argv: Sequence[str] | None = None) -> list[str]:
  """argv for absl with the shorthand moved into `--gin_bindings`."""
  rest, bindings = split_gin_shorthand(list(sys.argv if argv is None else argv))
  return rest + [f"--gin_bindings={b}" for b in bindings]
