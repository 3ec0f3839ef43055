"""SFT stopped mid-way and resumed equals the straight run, bit for bit."""

import jax
import numpy as np

from llmjax import checkpoint as ckpt_lib
from llmjax.data import instructions
from llmjax.metrics import read_metrics
from llmjax.stages import RunContext, run_stages
from llmjax.stages.context import TokenizerConfig
from llmjax.stages.sft import SFT
from llmjax.train import loop
from llmjax.train.optimizer import OptimizerConfig

from tests.conftest import TEST_MODEL


def sft_stage(tokenizer_path: str) -> SFT:
  # First-fit packing of whole examples, 4 rows a step: the data iterator's state (shuffle
  # position and packer) must be checkpointed and restored, not only the parameters.
  return SFT(
      model=TEST_MODEL,
      data=instructions.SFTDataConfig(seq_len=64, batch_size=4, builtin_train=200,
                                      builtin_eval=20, eval_batches=1),
      train=loop.TrainConfig(total_steps=6, log_every=1, eval_every=6, checkpoint_every=3),
      optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=2),
      tokenizer=TokenizerConfig(path=tokenizer_path), eval_questions=0)


def run(workdir, stage, stop_after=None) -> list[np.ndarray]:
  ctx = run_stages([stage], RunContext(workdir=str(workdir), stop_after=stop_after))
  return jax.tree.leaves(jax.device_get(ctx.outputs["sft"].params))


def test_sft_resume_after_interruption_is_exact(tmp_path, tokenizer_path):
  stage = sft_stage(tokenizer_path)
  expected = run(tmp_path / "straight", stage)
  run(tmp_path / "resumed", stage, stop_after=3)
  ckdir = str(tmp_path / "resumed" / "checkpoints" / "sft")
  assert ckpt_lib.Checkpointer(ckdir, 1).latest_step() == 3
  resumed = run(tmp_path / "resumed", stage)  # what a restarted process does
  assert len(resumed) == len(expected)
  for a, b in zip(resumed, expected):
    np.testing.assert_array_equal(a, b)  # params, optimizer state, RNG and data position
  train = [m for m in read_metrics(str(tmp_path / "resumed")) if m["kind"] == "train"]
  straight = [m for m in read_metrics(str(tmp_path / "straight")) if m["kind"] == "train"]
  assert [m["step"] for m in train] == [1, 2, 3, 4, 5, 6]
  # The same batches after the restart: the same losses and target counts, step by step.
  assert [(m["loss"], m["target_tokens"]) for m in train] == [
      (m["loss"], m["target_tokens"]) for m in straight]
