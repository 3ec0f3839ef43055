"""What every console script shares: errors in the user's input end as one line, exit 2."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import app

from llmjax.errors import LlmjaxError


def run(main: Callable[[list[str]], None], argv: Sequence[str] | None = None) -> None:
  """`absl.app.run(main)`, printing an `LlmjaxError` as `error: ...` without a traceback.

  Those errors name the file, line or key at fault and what to do; a traceback would bury
  that. Any other exception is a bug and keeps its traceback.
  """
  def guarded(args):
    try:
      main(args)
    except LlmjaxError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  app.run(guarded, argv=list(argv) if argv is not None else None)
