"""LoRA/QLoRA runs out to Hugging Face and PEFT adapters in, against the real clients: a merged
export loads in transformers, an adapter-only export loads with peft onto the base, and a
PEFT folder imports as a LoRA stage, all with the logits of our LoRA model."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from llmjax.checkpoint import Checkpointer
from llmjax.errors import CheckpointError, ConfigError
from llmjax.hf import export, import_
from llmjax.hf import peft as hf_peft
from llmjax.model import lora, quant
from llmjax.runs.load import load_run, read_stages
from tests.hf.test_interop import CHAT_TEMPLATE, _hf_logits, _save_hf, _tokens

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
# llama3: untied, every module incl. lm_head; qwen2: tied, QKV bias, rsLoRA on a subset;
# qlora: llama3 with an NF4 base (lm_head too) adapted only in part, so the merged export
# also holds quantized weights without adapters.
VARIANTS = {
    "llama3": ("llama3", lora.LoraConfig(rank=4, alpha=8.0, target_modules=ALL)),
    "qwen2": ("qwen2", lora.LoraConfig(rank=3, alpha=5.0, use_rslora=True,
                                       target_modules=("q_proj", "v_proj", "o_proj",
                                                       "down_proj"))),
    "qlora": ("llama3", lora.LoraConfig(
        rank=4, alpha=8.0, target_modules=("q_proj", "o_proj", "down_proj"),
        quantize_base=quant.QuantConfig(scheme="nf4", group_size=32, kernel="reference",
                                        quantize_lm_head=True))),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
  """kind -> (HF folder, its llmjax import), built once per kind."""
  out = {}
  for kind in ("llama3", "qwen2"):
    root = tmp_path_factory.mktemp(kind)
    _save_hf(str(root / "hf"), kind)
    out[kind] = str(root / "hf"), import_.import_hf(str(root / "hf"), str(root / "base"))
  return out


def _lora_run(base_workdir, lora_cfg, workdir):
  """A LoRA checkpoint saved as the train loop saves one, with random A and B; returns
  (our LoRA model's logits on `_tokens(5)`, the same adapters' logits on the float base)."""
  base = load_run(base_workdir)
  model = nnx.merge(base.graphdef, base.params)
  if lora_cfg.quantize_base is not None:
    quant.quantize_model(model, lora_cfg.quantize_base)
  lora.add_lora(model, lora_cfg)
  graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  # B is zero at init: random A and B, or the adapter would change nothing and prove nothing.
  adapters = jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape, x.dtype)
                                       for x, k in zip(leaves, keys)])
  meta = {"model": dataclasses.asdict(base.model_cfg), "stage": "sft", "step": 3,
          "tokenizer": None, "lora": lora_cfg.to_dict(),
          "base": {"workdir": base_workdir, "stage": "import", "step": 0}}
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "sft"), every=1, async_save=False)
  ckpt.save_params_only(3, adapters, meta)
  ckpt.wait()
  ckpt.close()
  tokens = jnp.asarray(_tokens(5))
  ours = np.asarray(nnx.merge(graphdef, adapters, rest)(tokens))
  if lora_cfg.quantize_base is None:
    return ours, ours
  # What peft computes with a QLoRA adapter on the float base: the base is not quantized.
  on_float = lora.add_lora(nnx.merge(base.graphdef, base.params),
                           dataclasses.replace(lora_cfg, quantize_base=None))
  nnx.update(on_float, adapters)
  return ours, np.asarray(on_float(tokens))


@pytest.fixture(scope="module", params=list(VARIANTS))
def lora_run(request, bases, tmp_path_factory):
  """(variant, HF base folder, LoRA workdir, our logits, logits on the float base)."""
  kind, lora_cfg = VARIANTS[request.param]
  hf_dir, base_workdir = bases[kind]
  workdir = str(tmp_path_factory.mktemp("lora"))
  return (request.param, hf_dir, workdir, *_lora_run(base_workdir, lora_cfg, workdir))


def _logits(run):
  return np.asarray(nnx.merge(run.graphdef, run.params)(jnp.asarray(_tokens(5))))


def _hf(path):
  return transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()


def test_load_run_reproduces_lora_model(lora_run):
  _, _, workdir, ours, _ = lora_run
  run = load_run(workdir)
  assert run.stage == "sft" and lora.has_lora(run.params)
  np.testing.assert_allclose(_logits(run), ours, atol=1e-5, rtol=0)


def test_merged_export_loads_in_transformers(lora_run, tmp_path):
  # QLoRA included: the merged weights are the dequantized NF4 base + delta, the exact model.
  _, _, workdir, ours, _ = lora_run
  out = export.export_run(workdir, str(tmp_path / "hf"))
  diff = np.abs(_hf_logits(_hf(out), _tokens(5)) - ours).max()
  assert diff < 1e-4, diff


def test_adapter_only_loads_in_peft(lora_run, tmp_path):
  variant, hf_dir, workdir, _, on_float = lora_run
  out = export.export_run(workdir, str(tmp_path / "adapter"), adapter_only=True)
  assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
  with open(os.path.join(out, "adapter_config.json")) as f:
    cfg = json.load(f)
  lora_cfg = VARIANTS[variant][1]
  assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["use_rslora"],
          cfg["base_model_name_or_path"]) == (
              "LORA", "CAUSAL_LM", lora_cfg.rank, lora_cfg.alpha, lora_cfg.use_rslora, hf_dir)
  tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
  per_layer = len([t for t in lora_cfg.target_modules if t != "lm_head"])
  assert len(tensors) == 2 * (2 * per_layer + ("lm_head" in lora_cfg.target_modules))
  assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (
      lora_cfg.rank, 64)
  model = peft.PeftModel.from_pretrained(_hf(cfg["base_model_name_or_path"]), out).eval()
  diff = np.abs(_hf_logits(model, _tokens(5)) - on_float).max()
  assert diff < 1e-4, diff


def test_adapter_roundtrip_through_import(lora_run, tmp_path):
  variant, hf_dir, workdir, _, on_float = lora_run
  adapter = export.export_run(workdir, str(tmp_path / "adapter"), adapter_only=True)
  out = import_.import_hf(hf_dir, str(tmp_path / "run"), peft_dir=adapter)
  assert read_stages(out) == ["import", "peft"]
  run = load_run(out)
  assert run.stage == "peft" and run.meta["base"] == {"workdir": out, "stage": "import",
                                                      "step": 0}
  assert lora.LoraConfig.from_dict(run.meta["lora"]) == dataclasses.replace(
      VARIANTS[variant][1], quantize_base=None)
  diff = np.abs(_logits(run) - on_float).max()
  assert diff < 1e-5, diff


# ---- adapters written by peft itself ----------------------------------------------------------


def _peft_adapter(base_model, path, **config):
  """Saves a peft LoRA adapter with random A and B on `base_model`; returns peft's logits."""
  torch.manual_seed(1)
  model = peft.get_peft_model(base_model, peft.LoraConfig(task_type="CAUSAL_LM", **config))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(0.2 * torch.randn_like(p))
  model.save_pretrained(path)
  return _hf_logits(model.eval(), _tokens(5))


@pytest.fixture(scope="module")
def peft_adapter(bases, tmp_path_factory):
  """(llama3 HF base folder, a peft-saved adapter folder on it, peft's logits). Targeting
  lm_head makes peft save its own copy of the head (`lm_head.base_layer.weight`)."""
  hf_dir = bases["llama3"][0]
  path = str(tmp_path_factory.mktemp("peft") / "adapter")
  logits = _peft_adapter(_hf(hf_dir), path, r=4, lora_alpha=16, lora_dropout=0.1,
                         target_modules=["q_proj", "k_proj", "down_proj", "lm_head"])
  return hf_dir, path, logits


def test_import_peft_saved_adapter(peft_adapter, tmp_path):
  hf_dir, path, theirs = peft_adapter
  assert "base_model.model.lm_head.base_layer.weight" in load_file(
      os.path.join(path, "adapter_model.safetensors"))
  path = shutil.copytree(path, str(tmp_path / "adapter"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:  # as SFT trainers save
    json.dump({"chat_template": CHAT_TEMPLATE}, f)
  out = import_.import_hf(hf_dir, str(tmp_path / "run"), peft_dir=path)
  run = load_run(out)
  assert run.meta["chat_template"] == CHAT_TEMPLATE
  assert lora.LoraConfig.from_dict(run.meta["lora"]) == lora.LoraConfig(
      rank=4, alpha=16.0, dropout=0.1, target_modules=("q_proj", "k_proj", "down_proj",
                                                       "lm_head"))
  diff = np.abs(_logits(run) - theirs).max()
  assert diff < 1e-4, diff


def test_import_refuses_adapter_of_another_base(bases, tmp_path):
  from tests.hf.test_interop import SMALL
  other = transformers.AutoModelForCausalLM.from_config(
      transformers.LlamaConfig(**{**SMALL, "intermediate_size": 128}))
  _peft_adapter(other, str(tmp_path / "adapter"), r=4, lora_alpha=8,
                target_modules=["q_proj", "gate_proj"])
  with pytest.raises(CheckpointError, match=r"tensor base_model\.model\.model\.layers\.0\.mlp\."
                     r"gate_proj\.lora_B\.weight has shape \[128, 4\], expected \[96, 4\]"):
    import_.import_hf(bases["llama3"][0], str(tmp_path / "out"), peft_dir=str(tmp_path /
                                                                               "adapter"))
  assert not os.path.exists(tmp_path / "out")


# ---- refusals: nothing written, and the reason named ------------------------------------------


@pytest.fixture
def adapter_copy(peft_adapter, tmp_path):
  return shutil.copytree(peft_adapter[1], str(tmp_path / "adapter"))


def _edit(path, config=None, tensors=None):
  """Changes adapter_config.json keys and/or the tensors (a function of the name->array dict)."""
  if config:
    with open(os.path.join(path, "adapter_config.json")) as f:
      cfg = json.load(f)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
      json.dump({**cfg, **config}, f)
  if tensors:
    file = os.path.join(path, "adapter_model.safetensors")
    save_file(tensors(load_file(file)), file)


def _refused(peft_adapter, adapter_copy, tmp_path, error, match):
  with pytest.raises(error, match=match):
    import_.import_hf(peft_adapter[0], str(tmp_path / "out"), peft_dir=adapter_copy)
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("config,match", [
    ({"use_dora": True}, "use_dora is true"),
    ({"bias": "lora_only"}, "bias is 'lora_only'"),
    ({"modules_to_save": ["embed_tokens"]}, "modules_to_save"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"target_modules": ".*\\.(q|k)_proj"}, "only a list of module names"),
    ({"target_modules": ["q_proj", "qkv"]}, r"target_modules names \['qkv'\]"),
    ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
    ({"init_lora_weights": "pissa"}, "rewrite the base weights"),
    ({"use_qalora": True}, "use_qalora=True"),
    ({"target_modules": ["q_proj"]}, r"down_proj.*adapt modules that target_modules \['q_proj'\]"),
])
def test_import_refuses_config(peft_adapter, adapter_copy, tmp_path, config, match):
  error = CheckpointError if config == {"target_modules": ["q_proj"]} else ConfigError
  _edit(adapter_copy, config=config)
  _refused(peft_adapter, adapter_copy, tmp_path, error, match)


LORA_B = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"


@pytest.mark.parametrize("change,match", [
    (lambda t: {k: v for k, v in t.items() if k != LORA_B}, f"tensor {LORA_B} is missing"),
    (lambda t: {**t, LORA_B.replace("mlp", "attn"): t[LORA_B]}, "name no Linear weight"),
    (lambda t: {**t, LORA_B: t[LORA_B][:-1]}, r"has shape \[63, 4\], expected \[64, 4\]"),
    (lambda t: {**t, "base_model.model.lm_head.base_layer.weight":
                1 + t["base_model.model.lm_head.base_layer.weight"]}, "copy of the base's"),
])
def test_import_refuses_tensors(peft_adapter, adapter_copy, tmp_path, change, match):
  _edit(adapter_copy, tensors=change)
  _refused(peft_adapter, adapter_copy, tmp_path, CheckpointError, match)


def test_import_refuses_pickled_adapter(peft_adapter, adapter_copy, tmp_path):
  os.rename(os.path.join(adapter_copy, "adapter_model.safetensors"),
            os.path.join(adapter_copy, "adapter_model.bin"))
  _refused(peft_adapter, adapter_copy, tmp_path, CheckpointError, "never loads")


def test_import_refuses_lm_head_adapter_on_tied_base(bases, peft_adapter, tmp_path):
  with pytest.raises(ConfigError, match="names lm_head, but the base ties it"):
    import_.import_hf(bases["qwen2"][0], str(tmp_path / "out"), peft_dir=peft_adapter[1])
  assert not os.path.exists(tmp_path / "out")


def test_adapter_export_refuses_names_peft_would_ignore(bases, tmp_path, monkeypatch):
  workdir = str(tmp_path / "lora")
  _lora_run(bases["qwen2"][1], VARIANTS["qwen2"][1], workdir)
  # Our module names where HF's belong: peft would load nothing and leave B = 0.
  names = hf_peft.AdapterSpec.names.fget
  monkeypatch.setattr(hf_peft.AdapterSpec, "names", property(
      lambda spec: tuple(n.replace("self_attn", "attn") for n in names(spec))))
  with pytest.raises(CheckpointError,
                     match=r"layers\.0\.attn\.o_proj\.lora_A\.weight.*name no Linear weight"):
    export.export_run(workdir, str(tmp_path / "adapter"), adapter_only=True)
  assert not os.path.exists(tmp_path / "adapter")


def test_adapter_only_refuses_non_lora_run(bases, tmp_path):
  with pytest.raises(ConfigError, match="not a LoRA checkpoint.*drop --adapter_only"):
    export.export_run(bases["qwen2"][1], str(tmp_path / "adapter"), adapter_only=True)
  assert not os.path.exists(tmp_path / "adapter")


def test_cli_adapter_export_and_peft_import(bases, tmp_path):
  from tests.hf.test_interop import _cli
  workdir = str(tmp_path / "lora")
  _, on_float = _lora_run(bases["qwen2"][1], VARIANTS["qwen2"][1], workdir)
  r = _cli("llmjax.cli.export", f"--workdir={workdir}", f"--output={tmp_path / 'adapter'}",
           "--adapter_only")
  assert r.returncode == 0, r.stderr
  r = _cli("llmjax.cli.import_", f"--hf={bases['qwen2'][0]}", f"--peft={tmp_path / 'adapter'}",
           f"--output={tmp_path / 'run'}")
  assert r.returncode == 0, r.stderr
  diff = np.abs(_logits(load_run(str(tmp_path / "run"))) - on_float).max()
  assert diff < 1e-5, diff
