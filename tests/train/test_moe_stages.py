"""A mixture of experts through the stages: pretrain stopped and resumed (exact), then SFT
and LoRA DPO from it, with the router losses trained on and logged in each."""

import math

import jax
import numpy as np
import pytest

from llmjax.data import instructions, preferences
from llmjax.data.pipeline import DataConfig
from llmjax.metrics import read_metrics
from llmjax.model.config import model_config
from llmjax.model.lora import LoraConfig
from llmjax.runs.load import load_run
from llmjax.stages import RunContext, run_stages
from llmjax.stages.context import TokenizerConfig
from llmjax.stages.dpo import dpo_stage
from llmjax.stages.pretrain import Pretrain
from llmjax.stages.sft import SFT
from llmjax.train import loop
from llmjax.train.optimizer import OptimizerConfig

# The preset, narrowed: 8 experts of width 32, top-2.
MODEL = model_config("tiny_moe", {"d_model": 64, "n_heads": 4, "d_ff_expert": 32})
ROUTER_METRICS = ("moe/load_balancing_loss", "moe/z_loss", "moe/max_load",
                  "moe/dropped_fraction", *(f"moe/load_e{i}" for i in range(8)))


def train_cfg(steps, every):
  return loop.TrainConfig(total_steps=steps, log_every=1, eval_every=steps,
                          checkpoint_every=every)


def pretrain(tokenizer_path):
  return Pretrain(model=MODEL, data=DataConfig(seq_len=64, batch_size=4, eval_documents=16,
                                               eval_batches=1),
                  train=train_cfg(4, 2),
                  optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
                  tokenizer=TokenizerConfig(path=tokenizer_path))


def records(workdir, stage, kind):
  return [r for r in read_metrics(str(workdir)) if r["stage"] == stage and r["kind"] == kind]


def assert_router_metrics(record):
  for name in ROUTER_METRICS:
    assert math.isfinite(record[name]), name
  assert sum(record[f"moe/load_e{i}"] for i in range(8)) == pytest.approx(1.0, abs=1e-5)
  assert 1.0 <= record["moe/max_load"] <= 8.0 and record["moe/dropped_fraction"] == 0.0
  assert record["moe/load_balancing_loss"] > 0 and record["moe/z_loss"] > 0


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tokenizer_path):
  workdir = tmp_path_factory.mktemp("moe_pretrain")
  ctx = run_stages([pretrain(tokenizer_path)], RunContext(workdir=str(workdir)))
  return workdir, jax.device_get(ctx.outputs["pretrain"].params)


def test_moe_pretrain_resumes_exactly_and_logs_its_router(pretrained, tmp_path, tokenizer_path):
  workdir, params = pretrained
  run_stages([pretrain(tokenizer_path)], RunContext(workdir=str(tmp_path), stop_after=2))
  ctx = run_stages([pretrain(tokenizer_path)], RunContext(workdir=str(tmp_path)))
  for a, b in zip(jax.tree.leaves(jax.device_get(ctx.outputs["pretrain"].params)),
                  jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  # The checkpoint holds the stacked expert weights; a fresh load gives them back.
  loaded = load_run(str(workdir))
  assert loaded.model_cfg == MODEL
  for a, b in zip(jax.tree.leaves(jax.device_get(loaded.params)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  train = records(workdir, "pretrain", "train")
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  for r in train:
    assert_router_metrics(r)
  (evaluation,) = records(workdir, "pretrain", "eval")
  assert_router_metrics(evaluation)
  assert evaluation["loss"] < train[0]["loss"]


def test_sft_and_lora_dpo_train_an_moe_model(pretrained, tmp_path, tokenizer_path):
  workdir, _ = pretrained
  sft = SFT(model=MODEL,
            data=instructions.SFTDataConfig(seq_len=64, batch_size=4, builtin_train=32,
                                            builtin_eval=8, eval_batches=1),
            train=train_cfg(2, 2), optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
            tokenizer=TokenizerConfig(path=tokenizer_path), init_from=str(workdir),
            eval_questions=0)
  # LoRA on an MoE model adapts the attention (expert weights take no adapters); the
  # reference is the base with adapters off, whose routing adds no router loss.
  dpo = dpo_stage(model=MODEL,
                  data=preferences.PreferenceDataConfig(seq_len=128, batch_size=4,
                                                        max_pairs_per_row=2, builtin_train=16,
                                                        builtin_eval=4, eval_batches=1),
                  train=train_cfg(2, 2),
                  optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=1),
                  tokenizer=TokenizerConfig(path=tokenizer_path), eval_questions=0,
                  lora=LoraConfig(rank=4, target_modules=("q_proj", "v_proj", "o_proj")))
  run_stages([sft, dpo], RunContext(workdir=str(tmp_path)))
  for stage in ("sft", "dpo"):
    train = records(tmp_path, stage, "train")
    assert [r["step"] for r in train] == [1, 2], stage
    for r in train:
      assert math.isfinite(r["loss"]) and r["grad_norm"] > 0, stage
      assert_router_metrics(r)
    (evaluation,) = records(tmp_path, stage, "eval")
    assert_router_metrics(evaluation)
