"""A resumed run without TokenizerConfig.path uses the tokenizer its checkpoints record (the
copy of the path it was started with), never a newly trained one."""

import os
import shutil

import jax.numpy as jnp
import pytest

from llmjax.checkpoint import Checkpointer
from llmjax.errors import CheckpointError
from llmjax.stages.context import RunContext, TokenizerConfig

from tests.conftest import TEST_MODEL


def _run_started_with(workdir, tokenizer_path, name):
  """What a run started with TokenizerConfig.path=<...>/`name` leaves in its workdir: the
  tokenizer copied in under its own name, recorded in the checkpoint's meta (no training:
  the meta is all a resume reads to find it)."""
  os.makedirs(workdir)
  shutil.copy(tokenizer_path, os.path.join(workdir, name))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "pretrain"), every=1,
                      async_save=False)
  ckpt.save_params_only(3, {"w": jnp.zeros(2)},
                        {"stage": "pretrain", "step": 3, "tokenizer": name})
  ckpt.close()


def test_resume_without_a_path_uses_the_recorded_tokenizer(tmp_path, tokenizer_path):
  workdir = str(tmp_path / "run")
  _run_started_with(workdir, tokenizer_path, "mine.model")
  ctx = RunContext(workdir=workdir)
  # No documents: training a new tokenizer instead (what a resume did) cannot succeed. The
  # stage asking is another than the one whose checkpoint records it: a run has one tokenizer.
  tokenizer = ctx.ensure_tokenizer(TokenizerConfig(), [], TEST_MODEL, "sft")
  assert tokenizer.path == os.path.join(workdir, "mine.model")
  assert ctx.tokenizer_file() == "mine.model"  # what the next checkpoints record
  assert not os.path.exists(os.path.join(workdir, "tokenizer.model"))


def test_resume_names_a_missing_recorded_tokenizer(tmp_path, tokenizer_path):
  workdir = str(tmp_path / "run")
  _run_started_with(workdir, tokenizer_path, "mine.model")
  os.remove(os.path.join(workdir, "mine.model"))
  with pytest.raises(CheckpointError, match=r"/run/mine\.model is missing: the checkpoints in "
                     r"\S+/run were trained with it; copy it back"):
    RunContext(workdir=workdir).ensure_tokenizer(TokenizerConfig(), ["text"], TEST_MODEL)
