"""Mixture-of-experts Hugging Face interop against transformers itself: Mixtral and Qwen2-MoE
folders saved by transformers import with matching logits, and llmjax MoE runs export as
folders transformers loads with matching logits; both round trips are exact."""

import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

from llmjax.checkpoint import Checkpointer
from llmjax.errors import CheckpointError, ConfigError
from llmjax.hf import convert, export, import_
from llmjax.model.config import ModelConfig
from llmjax.model.transformer import build_model
from llmjax.runs.load import load_run

transformers = pytest.importorskip("transformers")

VOCAB = 128
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
             max_position_embeddings=256, router_aux_loss_coef=0.02, eos_token_id=None,
             bos_token_id=None)


def _hf_config(kind):
  if kind == "mixtral":
    return transformers.MixtralConfig(**SMALL, num_local_experts=4, rope_theta=1e6)
  # Qwen2-MoE as Qwen1.5-MoE: QKV bias, a gated shared expert, top-k weights not renormalised.
  return transformers.Qwen2MoeConfig(**SMALL, num_experts=4, moe_intermediate_size=24,
                                     shared_expert_intermediate_size=40, norm_topk_prob=False,
                                     tie_word_embeddings=True)


def _tensors(path):
  out = {}
  for f in sorted(os.listdir(path)):
    if f.endswith(".safetensors"):
      with safe_open(os.path.join(path, f), framework="numpy") as st:
        out.update({k: st.get_tensor(k) for k in st.keys()})
  return out


def _tokens(seed, shape=(2, 24)):
  return np.random.default_rng(seed).integers(0, VOCAB, shape)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens):
  return nnx.merge(graphdef, params)(tokens)


def _our_logits(graphdef, params, tokens):
  # Compiled: on XLA:CPU one jit of the tiny MoE costs a fraction of its first eager call.
  return np.asarray(_forward(graphdef, params, jnp.asarray(tokens)))


def _save_hf(path, kind):
  """A random transformers MoE model, saved with save_pretrained. Norms, biases and the
  shared-expert gate are moved off their init, and the routers get logits of order 1, so
  every token's top-k is decided by clear margins (no near-ties that rounding could flip)."""
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(_hf_config(kind)).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.2 * torch.randn_like(p))
      elif name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
        p.normal_(0.0, 0.5)
  model.save_pretrained(path, safe_serialization=True)
  return model


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def hf_model(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(request.param) / "hf")
  return request.param, path, _save_hf(path, request.param)


@pytest.fixture(scope="module")
def imported(hf_model, tmp_path_factory):
  kind, path, model = hf_model
  out = import_.import_hf(path, str(tmp_path_factory.mktemp("imp") / "run"))
  return kind, path, model, out


def test_transformers_saves_the_per_expert_layout(hf_model):
  """transformers 5 computes with fused experts, but save_pretrained writes the Hub's
  per-expert tensors: the only layout the converter reads and writes."""
  kind, path, _ = hf_model
  names = set(_tensors(path))
  expert = ("model.layers.1.block_sparse_moe.experts.3.w2.weight" if kind == "mixtral"
            else "model.layers.1.mlp.experts.3.down_proj.weight")
  assert expert in names and not any("gate_up_proj" in n for n in names)


def test_import_matches_hf_logits(imported):
  kind, _, model, out = imported
  run = load_run(out)
  cfg = run.model_cfg
  assert (cfg.n_experts, cfg.n_experts_per_token, cfg.router_aux_loss_coef) == (4, 2, 0.02)
  if kind == "mixtral":
    assert cfg.norm_topk_prob and not cfg.d_ff_shared and not cfg.qkv_bias
    assert cfg.resolved_d_ff_expert == 48 and run.meta["hf_architecture"] == convert.MIXTRAL
  else:
    assert (cfg.d_ff_expert, cfg.d_ff_shared, cfg.shared_expert_gate) == (24, 40, True)
    assert not cfg.norm_topk_prob and cfg.qkv_bias and cfg.tie_embeddings
  for seed in range(2):
    tokens = _tokens(seed)
    hf = _hf_logits(model, tokens)
    diff = np.abs(hf - _our_logits(run.graphdef, run.params, tokens)).max()
    assert diff < 1e-4, (kind, diff)
  # The comparison sees the routing: renormalising (or not) the top-k weights the other way
  # moves the logits by over 10x the tolerance (measured 3e-3 for Mixtral).
  flipped = nnx.split(nnx.eval_shape(lambda: build_model(
      dataclasses.replace(cfg, norm_topk_prob=not cfg.norm_topk_prob))))[0]
  assert np.abs(hf - _our_logits(flipped, run.params, tokens)).max() > 1e-3


def test_roundtrip_is_bitwise(imported, tmp_path):
  _, path, _, out = imported
  exported = export.export_run(out, str(tmp_path / "hf"))
  theirs, ours = _tensors(path), _tensors(exported)
  if "lm_head.weight" not in ours:  # tied: transformers may or may not save the copy
    theirs.pop("lm_head.weight", None)
  assert sorted(theirs) == sorted(ours)
  for name, value in theirs.items():
    assert ours[name].dtype == value.dtype and ours[name].tobytes() == value.tobytes(), name
  with open(os.path.join(path, "config.json")) as f:
    a = convert.config_from_hf(json.load(f))
  with open(os.path.join(exported, "config.json")) as f:
    assert convert.config_from_hf(json.load(f)) == a


# ---- llmjax MoE runs -> transformers --------------------------------------------------------

MIXTRAL_CFG = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                          head_dim=8, d_ff=48, n_experts=4, n_experts_per_token=2,
                          max_seq_len=256, rope_theta=1e6, router_aux_loss_coef=0.02)
# head_dim 16 != d_model / n_heads, so the export must carry it in config.json.
QWEN2_MOE_CFG = dataclasses.replace(MIXTRAL_CFG, qkv_bias=True, tie_embeddings=True, head_dim=16,
                                    d_ff_expert=24, d_ff_shared=40, shared_expert_gate=True,
                                    norm_topk_prob=False, norm_eps=1e-6)


def _perturbed_run(workdir, cfg, seed=3):
  """A run checkpoint of a random llmjax MoE whose norms, biases and routers are far from
  init (router logits of order 1, as in `_save_hf`)."""
  graphdef, params = nnx.split(build_model(cfg, seed))
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  scale = lambda path: 1.0 if "router" in jax.tree_util.keystr(path) else 0.1
  params = jax.tree.unflatten(tree, [x + scale(p) * jax.random.normal(k, x.shape, x.dtype)
                                     for (p, x), k in zip(leaves, keys)])
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "pretrain"), every=1,
                      async_save=False)
  meta = {"model": dataclasses.asdict(cfg), "stage": "pretrain", "step": 7, "tokenizer": None}
  ckpt.save(7, {"params": params, "step": jnp.int32(7)}, None, meta)
  ckpt.wait()
  ckpt.close()
  return graphdef, params


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def llmjax_run(request, tmp_path_factory):
  cfg = MIXTRAL_CFG if request.param == "mixtral" else QWEN2_MOE_CFG
  workdir = str(tmp_path_factory.mktemp("run"))
  return request.param, workdir, *_perturbed_run(workdir, cfg)


def test_export_loads_in_transformers_and_reimports(llmjax_run, tmp_path):
  kind, workdir, graphdef, params = llmjax_run
  out = export.export_run(workdir, str(tmp_path / "hf"))
  with open(os.path.join(out, "config.json")) as f:
    hf_cfg = json.load(f)
  assert hf_cfg["architectures"] == [convert.MIXTRAL if kind == "mixtral" else convert.QWEN2_MOE]
  model = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  assert type(model).__name__ == hf_cfg["architectures"][0]
  assert model.config.router_aux_loss_coef == 0.02
  tokens = _tokens(5)
  diff = np.abs(_hf_logits(model, tokens) - _our_logits(graphdef, params, tokens)).max()
  assert diff < 1e-4, (kind, diff)
  back = load_run(import_.import_hf(out, str(tmp_path / "back")))
  assert back.model_cfg.shape_dict() == load_run(workdir).model_cfg.shape_dict()
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_refuses_moe_shapes_without_hf_architecture():
  for cfg, match in [(dataclasses.replace(MIXTRAL_CFG, qkv_bias=True), "qkv_bias=True"),
                     (dataclasses.replace(MIXTRAL_CFG, norm_topk_prob=False),
                      "norm_topk_prob=False"),
                     (dataclasses.replace(QWEN2_MOE_CFG, shared_expert_gate=False),
                      "without shared_expert_gate"),
                     (dataclasses.replace(MIXTRAL_CFG, head="score", tie_embeddings=False),
                      "head 'score'")]:
    with pytest.raises(ConfigError, match=match):
      convert.config_to_hf(cfg)


# ---- refusals --------------------------------------------------------------------------------


def _config(path):
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("hf_model", ["mixtral"], indirect=True)
def test_refuses_mixtral_folder_with_router_jitter(hf_model, tmp_path):
  path = shutil.copytree(hf_model[1], str(tmp_path / "hf"))
  jittered = {**_config(path), "router_jitter_noise": 0.01}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(jittered, f)
  with pytest.raises(ConfigError, match=r"router_jitter_noise=0\.01 is not supported.*Set "
                     r"router_jitter_noise to 0\.0"):
    import_.import_hf(path, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("hf_model,changes,match", [
    ("mixtral", {"sliding_window": 16}, r"sliding_window=16 limits attention"),
    ("mixtral", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("qwen2_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    ("qwen2_moe", {"mlp_only_layers": [1]}, r"mlp_only_layers=\[1\]"),
    ("qwen2_moe", {"use_sliding_window": True, "max_window_layers": 1,
                   "layer_types": ["full_attention", "sliding_attention"]}, r"layers \[1\]"),
    ("qwen2_moe", {"num_experts_per_tok": 5}, "n_experts_per_token"),
], indirect=["hf_model"])
def test_refuses_unsupported_config(hf_model, changes, match):
  with pytest.raises(ConfigError, match=match):
    convert.config_from_hf({**_config(hf_model[1]), **changes})


@pytest.mark.parametrize("hf_model", ["mixtral"], indirect=True)
def test_accepts_full_length_sliding_window_and_router_logits(hf_model):
  """A window as long as the context is full attention; output_router_logits is an output
  option, not part of the model."""
  hf = _config(hf_model[1])
  same = {**hf, "sliding_window": hf["max_position_embeddings"], "output_router_logits": True}
  assert convert.config_from_hf(same) == convert.config_from_hf(hf)


@pytest.mark.parametrize("hf_model", ["mixtral"], indirect=True)
def test_refuses_fused_expert_layout(hf_model, tmp_path):
  """transformers 5's in-memory names (fused gate_up_proj): refused with how to re-save."""
  from safetensors.torch import save_file
  _, path, model = hf_model
  folder = str(tmp_path / "fused")
  os.makedirs(folder)
  shutil.copy(os.path.join(path, "config.json"), folder)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            os.path.join(folder, "model.safetensors"))
  with pytest.raises(CheckpointError, match="fused in-memory expert layout.*save_pretrained"):
    import_.import_hf(folder, str(tmp_path / "out"))


@pytest.mark.parametrize("preset,arch", [("mixtral_8x7b", convert.MIXTRAL),
                                         ("qwen1_5_moe_a2_7b", convert.QWEN2_MOE)])
def test_presets_map_to_their_architecture(preset, arch):
  from llmjax.model.config import PRESETS
  cfg = dataclasses.replace(PRESETS[preset], head_dim=PRESETS[preset].resolved_head_dim)
  hf = convert.config_to_hf(cfg)
  assert hf["architectures"] == [arch]
  assert convert.config_from_hf(hf).shape_dict() == cfg.shape_dict()
  assert convert.config_from_hf(hf).router_aux_loss_coef == cfg.router_aux_loss_coef
