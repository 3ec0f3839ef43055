"""What every console script shares: errors in the user's input end as one line, exit 2."""

from __future__ import annotations

import logging as std_logging
import re
import sys
import traceback
from typing import Callable, Sequence

from absl import app, logging

from llmjax.errors import LlmjaxError


def run(main: Callable[[list[str]], None], argv: Sequence[str] | None = None,
        commands: Sequence[str] = ()) -> None:
  """`absl.app.run(main)`, printing an `LlmjaxError` as one line `error: ...` and exiting 2.

  Those errors name the file, line or key at fault and what to do; a traceback would bury
  that, so it is shown only with `--verbosity=1` (absl's debug level, `-v 1`). Any other
  exception is a bug and keeps its traceback (exit 1). A script takes no positional
  argument but one of its `commands` (`llmjax-scaling plan`), so a stray one (a flag missing
  its `--`) is a usage error, not ignored.
  """
  def guarded(args):
    if commands and (len(args) < 2 or args[1] not in commands):
      raise app.UsageError(f"give a command first: one of {list(commands)}")
    if len(args) > (2 if commands else 1):
      raise app.UsageError(f"unexpected arguments: {args[2 if commands else 1:]}")
    logging.get_absl_handler().addFilter(_quiet_libraries)
    try:
      main(args)
    except LlmjaxError as e:
      if logging.level_debug():
        traceback.print_exc()
      print(f"error: {one_line(e)}", file=sys.stderr)
      sys.exit(2)
  app.run(guarded, argv=list(argv) if argv is not None else None)


# gin appends where a configurable was called ("\n  In call to configurable 'TrainConfig'
# (<class ...>)") to every exception raised inside one; our messages name the key already.
_GIN_CALL_SITE = re.compile(r"^\s*In call to configurable .*$", re.MULTILINE)


def one_line(error: BaseException) -> str:
  """The error's message on one line: gin's call sites dropped, other lines joined."""
  text = _GIN_CALL_SITE.sub("", str(error))
  return " ".join(line.strip() for line in text.splitlines() if line.strip())


# Orbax and grain log every save and iterator step at INFO; that drowns the progress line.
_CHATTY = ("/orbax/", "/grain/", "xla_bridge.py")
# Orbax warns whenever it opens a folder read-only, which is how runs are read.
_EXPECTED_WARNINGS = ("Given directory is read only",)


def _quiet_libraries(record: std_logging.LogRecord) -> bool:
  if "/orbax/" in record.pathname and str(record.msg).startswith(_EXPECTED_WARNINGS):
    return False
  return record.levelno >= std_logging.WARNING or not any(
      part in record.pathname for part in _CHATTY)
