"""Reward models (head 'score') against transformers' *ForSequenceClassification: export,
score parity on a padded batch, import back, and export_run's architecture and --task."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from llmjax.checkpoint import Checkpointer, check_same_model
from llmjax.errors import ConfigError
from llmjax.hf import convert, export, import_
from llmjax.model.config import ModelConfig
from llmjax.model.reward import score_sequences
from llmjax.model.transformer import build_model
from llmjax.runs.load import load_run, record_stages

transformers = pytest.importorskip("transformers")

LLAMA_RM = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       d_ff=96, head_dim=16, max_seq_len=256, head="score")
QWEN2_RM = dataclasses.replace(LLAMA_RM, qkv_bias=True, tie_embeddings=True, norm_eps=1e-6)
# Different lengths, none holding the pad id (0), which HF reads as the end of a row.
SEQUENCES = [[7, 100, 42, 9, 300], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 200, 400], [33]]


def _perturbed(cfg, seed):
  """(graphdef, params) of a random model whose norms, biases and score are far from init."""
  graphdef, params = nnx.split(build_model(cfg, seed))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return graphdef, jax.tree.unflatten(tree, leaves)


def _save_stage(workdir, stage, cfg, params, tokenizer):
  shutil.copy(tokenizer.path, os.path.join(workdir, "tokenizer.model"))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", stage), every=1, async_save=False)
  meta = {"model": dataclasses.asdict(cfg), "stage": stage, "step": 1,
          "tokenizer": "tokenizer.model"}
  ckpt.save_params_only(1, params, meta)
  ckpt.wait()
  ckpt.close()
  record_stages(workdir, [stage])


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exported(request, tokenizer, tmp_path_factory):
  cfg = LLAMA_RM if request.param == "llama" else QWEN2_RM
  graphdef, params = _perturbed(cfg, seed=4)
  out = export.export_params(params, cfg, str(tmp_path_factory.mktemp("rm") / "hf"),
                             tokenizer=tokenizer)
  return cfg, graphdef, params, out


def test_export_scores_match_transformers(exported, tokenizer):
  cfg, graphdef, params, out = exported
  with open(os.path.join(out, "config.json")) as f:
    hf_cfg = json.load(f)
  arch = "Qwen2" if cfg.qkv_bias else "Llama"
  assert hf_cfg["architectures"] == [f"{arch}ForSequenceClassification"]
  assert hf_cfg["id2label"] == {"0": "LABEL_0"} and hf_cfg["label2id"] == {"LABEL_0": 0}
  assert hf_cfg["pad_token_id"] == tokenizer.pad_id == 0
  assert not os.path.exists(os.path.join(out, "generation_config.json"))
  model = transformers.AutoModelForSequenceClassification.from_pretrained(out).float().eval()
  assert model.config.num_labels == 1 and type(model).__name__ == hf_cfg["architectures"][0]
  width = max(map(len, SEQUENCES))
  ids = np.full((len(SEQUENCES), width), hf_cfg["pad_token_id"], np.int64)
  mask = np.zeros_like(ids)
  for i, s in enumerate(SEQUENCES):
    ids[i, :len(s)], mask[i, :len(s)] = s, 1
  with torch.no_grad():
    hf = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits
  assert hf.shape == (len(SEQUENCES), 1)
  ours = score_sequences(graphdef, params, SEQUENCES)
  assert ours.shape == (len(SEQUENCES),) and ours.dtype == np.float32
  np.testing.assert_allclose(hf[:, 0].numpy(), ours, atol=1e-4, rtol=0)
  assert np.ptp(ours) > 1e-2  # the rows' scores differ: a wrong read position would show


def test_import_gives_identical_params(exported):
  cfg, _, params, out = exported
  back_cfg, _, back = import_.load_hf_params(out)
  assert back_cfg == cfg
  assert "lm_head" not in back and back["score"][...].shape == (cfg.d_model, 1)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_refuses_other_num_labels(exported):
  with open(os.path.join(exported[3], "config.json")) as f:
    hf_cfg = json.load(f)
  assert convert.config_from_hf(hf_cfg).head == "score"
  three = {**hf_cfg, "id2label": {str(i): f"LABEL_{i}" for i in range(3)}}
  three.pop("num_labels", None)
  with pytest.raises(ConfigError, match="num_labels=3; only num_labels=1"):
    convert.config_from_hf(three)
  bare = {k: v for k, v in hf_cfg.items() if k not in ("num_labels", "id2label", "label2id")}
  with pytest.raises(ConfigError, match="num_labels=2"):  # transformers' default
    convert.config_from_hf(bare)


# ---- export_run: the architecture follows the head; --task checks it ------------------------


@pytest.fixture(scope="module")
def two_stage_run(tokenizer, tmp_path_factory):
  """A workdir with stages sft (a language model) then rm (its reward model)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  lm_cfg = dataclasses.replace(LLAMA_RM, head="lm")
  _save_stage(workdir, "sft", lm_cfg, _perturbed(lm_cfg, 1)[1], tokenizer)
  _save_stage(workdir, "rm", LLAMA_RM, _perturbed(LLAMA_RM, 2)[1], tokenizer)
  return workdir


def test_export_run_picks_architecture(two_stage_run, tmp_path):
  rm = export.export_run(two_stage_run, str(tmp_path / "rm"), task="reward")
  lm = export.export_run(two_stage_run, str(tmp_path / "lm"), stage="sft", task="causal_lm")
  archs = [json.load(open(os.path.join(d, "config.json")))["architectures"] for d in (rm, lm)]
  assert archs == [["LlamaForSequenceClassification"], ["LlamaForCausalLM"]]
  assert os.path.isfile(os.path.join(lm, "generation_config.json"))


@pytest.mark.parametrize("stage,task,match", [
    (None, "causal_lm", r"stage 'rm' is a reward model \(head 'score'\); the stage\(s\) with "
                        r"head 'lm' are \['sft'\]"),
    ("sft", "reward", r"stage 'sft' is a language model \(head 'lm'\); the stage\(s\) with "
                      r"head 'score' are \['rm'\]"),
    (None, "classify", "--task='classify' is not supported"),
])
def test_export_task_mismatch_writes_nothing(two_stage_run, tmp_path, stage, task, match):
  with pytest.raises(ConfigError, match=match):
    export.export_run(two_stage_run, str(tmp_path / "out"), stage=stage, task=task)
  assert os.listdir(tmp_path) == []


def test_adapter_only_refuses_a_reward_model(two_stage_run, tmp_path):
  with pytest.raises(ConfigError, match="reward model.*drop --adapter_only"):
    export.export_run(two_stage_run, str(tmp_path / "out"), adapter_only=True)
  assert os.listdir(tmp_path) == []


def test_export_task_reward_without_score_stage(tokenizer, tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  cfg = dataclasses.replace(LLAMA_RM, head="lm")
  _save_stage(workdir, "sft", cfg, nnx.state(build_model(cfg)), tokenizer)
  with pytest.raises(ConfigError, match="no stage of this run has head 'score'"):
    export.export_run(workdir, str(tmp_path / "out"), task="reward")
  assert sorted(os.listdir(tmp_path)) == ["run"]


def test_cli_export_task_error(two_stage_run, tmp_path):
  import subprocess
  import sys
  r = subprocess.run([sys.executable, "-m", "llmjax.cli.export", f"--workdir={two_stage_run}",
                      f"--output={tmp_path / 'out'}", "--task=causal_lm"],
                     capture_output=True, text=True, timeout=120,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode != 0 and "head 'lm' are ['sft']" in r.stderr, r.stderr
  assert os.listdir(tmp_path) == []


def test_lm_checkpoint_without_head_loads(tokenizer, tmp_path):
  """Checkpoints from before `ModelConfig.head` load as language models."""
  cfg = dataclasses.replace(LLAMA_RM, head="lm")
  params = nnx.state(build_model(cfg))
  shutil.copy(tokenizer.path, tmp_path / "tokenizer.model")
  old = dataclasses.asdict(cfg)
  del old["head"]
  ckpt = Checkpointer(str(tmp_path / "checkpoints" / "pretrain"), every=1, async_save=False)
  ckpt.save_params_only(3, params, {"model": old, "stage": "pretrain", "step": 3,
                                    "tokenizer": "tokenizer.model"})
  ckpt.wait()
  ckpt.close()
  run = load_run(str(tmp_path))
  assert run.model_cfg == cfg and "lm_head" in run.params
  check_same_model(old, cfg, "here")  # a resumed run sees the same model
  with pytest.raises(Exception, match="head: checkpoint 'lm' vs config 'score'"):
    check_same_model(old, LLAMA_RM, "here")
