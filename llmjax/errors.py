"""Errors that tell the user what to fix.

Every error raised on bad input is one of these, and its message names the file, line, key or
value at fault and says what to do about it.
"""


class LlmjaxError(Exception):
  """Base class for errors caused by the user's input or configuration."""


class ConfigError(LlmjaxError, ValueError):
  """A gin binding, flag or model configuration is wrong or missing."""


class DataError(LlmjaxError, ValueError):
  """A data file is missing, empty or malformed."""


class CheckpointError(LlmjaxError, ValueError):
  """A checkpoint cannot be used (wrong model shape, missing files)."""


class TrainingDivergedError(LlmjaxError, RuntimeError):
  """The loss or gradients became NaN/Inf."""
