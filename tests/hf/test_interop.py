"""Hugging Face interop against the real client: transformers loads what we export, and we
import what transformers saves, with matching logits, tokens and bitwise-equal tensors."""

import dataclasses
import json
import os
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

from llmjax.checkpoint import Checkpointer
from llmjax.runs.load import load_run
from llmjax.data.hf_tokenizer import HFTokenizer, load_tokenizer
from llmjax.data.tokenizer import train_tokenizer
from llmjax.errors import CheckpointError, ConfigError
from llmjax.hf import convert, export, import_
from llmjax.model.config import ModelConfig, RopeScaling
from llmjax.model.transformer import build_model
from llmjax.sample.sampler import Sampler

transformers = pytest.importorskip("transformers")

VOCAB = 384  # room for the SentencePiece byte pieces, so a real tokenizer fits
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
# A small original context (16) so the test sequences (48 tokens) run past it, where the
# Llama-3 frequency scaling changes rotation angles by radians; with the real 8192 it moves
# the logits of a short sequence by less than the comparison's tolerance.
ROPE_ORIGINAL_MAX = 16
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": ROPE_ORIGINAL_MAX}
SAMPLE = "Alice has 12 cats and  two dogs.\n<|im_start|>user\nhi there<|im_end|> café 🙂"
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def _tensors(path):
  """name -> numpy array of every safetensors file in a folder."""
  out = {}
  for f in sorted(os.listdir(path)):
    if f.endswith(".safetensors"):
      with safe_open(os.path.join(path, f), framework="numpy") as st:
        out.update({k: st.get_tensor(k) for k in st.keys()})
  return out


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.float().numpy()


def _our_logits(graphdef, params, tokens):
  return np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens)))


def _tokens(seed, shape=(2, 24)):
  return np.random.default_rng(seed).integers(0, VOCAB, shape)


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
  rng = np.random.default_rng(0)
  words = "the quick brown fox jumps over a lazy dog Alice has cats 12 345 café".split()
  texts = [" ".join(rng.choice(words, 40)) for _ in range(300)]
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
  return train_tokenizer(texts, path, vocab_size=VOCAB)


def _save_hf(path, kind):
  """A random HF model with non-trivial norms and biases, saved as safetensors."""
  torch.manual_seed(0)
  if kind == "llama3":
    cfg = transformers.LlamaConfig(**SMALL, rope_theta=500_000.0, rope_scaling=LLAMA3_ROPE,
                                   max_position_embeddings=131_072, rms_norm_eps=1e-5,
                                   eos_token_id=None, bos_token_id=None)
  else:
    cfg = transformers.Qwen2Config(**SMALL, tie_word_embeddings=True, rope_theta=1e6,
                                   eos_token_id=None, bos_token_id=None)
  model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.2 * torch.randn_like(p))
  model.save_pretrained(path, safe_serialization=True)
  return model


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def hf_model(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(request.param) / "hf")
  return request.param, path, _save_hf(path, request.param)


@pytest.fixture(scope="module")
def imported(hf_model, tmp_path_factory):
  kind, path, model = hf_model
  out = import_.import_hf(path, str(tmp_path_factory.mktemp("imp") / "run"))
  return kind, path, model, out


def test_import_matches_hf_logits(imported):
  kind, _, model, out = imported
  run = load_run(out)
  assert run.stage == "import" and run.step == 0 and run.tokenizer is None
  cfg = run.model_cfg
  if kind == "llama3":
    assert cfg.rope_scaling == RopeScaling(32.0, 1.0, 4.0, ROPE_ORIGINAL_MAX)
    assert cfg.rope_theta == 5e5 and not cfg.qkv_bias and not cfg.tie_embeddings
  else:
    assert cfg.qkv_bias and cfg.tie_embeddings
  for seed in range(2):
    tokens = _tokens(seed, (2, 3 * ROPE_ORIGINAL_MAX))  # positions up to 3x the original
    hf = _hf_logits(model, tokens)
    diff = np.abs(hf - _our_logits(run.graphdef, run.params, tokens))
    assert diff.max() < 1e-4, (kind, diff.max())
  if kind == "llama3":
    # The comparison can see the scaling: without it the same weights give logits over 10x
    # the tolerance away (measured 6e-3; with the real original context 8192 and 24 tokens,
    # as this test had before, 3e-5: under the tolerance, so disabling scaling passed).
    unscaled = nnx.split(nnx.eval_shape(
        lambda: build_model(dataclasses.replace(cfg, rope_scaling=None))))[0]
    assert np.abs(hf - _our_logits(unscaled, run.params, tokens)).max() > 1e-3


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


def test_greedy_generation_matches(imported):
  _, _, model, out = imported
  run = load_run(out)
  for seed in range(2):
    prompt = _tokens(10 + seed, (1, 8))
    with torch.no_grad():
      hf = model.generate(torch.as_tensor(prompt), max_new_tokens=16, do_sample=False,
                          attention_mask=torch.ones_like(torch.as_tensor(prompt)))
    ours = Sampler(run.graphdef, run.params, eos_ids=[]).sample(
        [prompt[0].tolist()], max_new_tokens=16).completion(0)
    assert hf[0, 8:].tolist() == ours


def _perturbed_run(workdir, cfg, tokenizer, seed):
  """A run checkpoint of a random llmjax model whose norms and biases are far from init."""
  graphdef, params = nnx.split(build_model(cfg, seed))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  params = jax.tree.unflatten(tree, leaves)
  shutil.copy(tokenizer.path, os.path.join(workdir, "tokenizer.model"))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "pretrain"), every=1,
                      async_save=False)
  meta = {"model": dataclasses.asdict(cfg), "stage": "pretrain", "step": 7,
          "tokenizer": "tokenizer.model", "chat_template": CHAT_TEMPLATE}
  ckpt.save(7, {"params": params, "step": jnp.int32(7)}, None, meta)
  ckpt.wait()
  ckpt.close()
  return graphdef, params


LLAMA_CFG = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        d_ff=96, rope_theta=500_000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64),
                        max_seq_len=256)
QWEN_CFG = dataclasses.replace(LLAMA_CFG, rope_scaling=None, qkv_bias=True, tie_embeddings=True,
                               head_dim=32, norm_eps=1e-6)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def llmjax_run(request, sp_tokenizer, tmp_path_factory):
  cfg = LLAMA_CFG if request.param == "llama" else QWEN_CFG
  workdir = str(tmp_path_factory.mktemp("run"))
  graphdef, params = _perturbed_run(workdir, cfg, sp_tokenizer, seed=3)
  return workdir, graphdef, params


def _check_loads(path, graphdef, params, atol=1e-4):
  model = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
  tokens = _tokens(5)
  diff = np.abs(_hf_logits(model, tokens) - _our_logits(graphdef, params, tokens)).max()
  assert diff < atol, diff
  return model


def test_export_loads_in_transformers(llmjax_run, tmp_path, sp_tokenizer):
  workdir, graphdef, params = llmjax_run
  out = export.export_run(workdir, str(tmp_path / "hf"))
  assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["model.safetensors"]
  # Readable by others: an export is handed to other users and services.
  assert all(os.stat(os.path.join(out, f)).st_mode & 0o044 == 0o044 for f in os.listdir(out))
  _check_loads(out, graphdef, params)
  # transformers 5 forces Qwen2Tokenizer (byte-level) on model_type qwen2, so a SentencePiece
  # tokenizer of a Qwen2 export is loaded by the generic class; AutoTokenizer for Llama.
  qwen2 = json.load(open(os.path.join(out, "config.json")))["model_type"] == "qwen2"
  cls = transformers.PreTrainedTokenizerFast if qwen2 else transformers.AutoTokenizer
  tok = cls.from_pretrained(out)
  assert tok(SAMPLE)["input_ids"] == sp_tokenizer.encode(SAMPLE, add_bos=True)
  assert tok.decode(tok(SAMPLE)["input_ids"], skip_special_tokens=False).endswith("🙂")
  assert tok.chat_template == CHAT_TEMPLATE
  with open(os.path.join(out, "generation_config.json")) as f:
    gen = json.load(f)
  assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (2, 3, 0)


def test_sharded_export_loads_and_reimports(llmjax_run, tmp_path):
  workdir, graphdef, params = llmjax_run
  out = export.export_run(workdir, str(tmp_path / "hf"), max_shard_size="40KB")
  shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    assert set(json.load(f)["weight_map"].values()) == set(shards)
  _check_loads(out, graphdef, params)
  back = load_run(import_.import_hf(out, str(tmp_path / "back")))
  assert back.tokenizer.encode(SAMPLE) == load_run(workdir).tokenizer.encode(SAMPLE)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_export_loads(llmjax_run, tmp_path):
  workdir, graphdef, params = llmjax_run
  out = export.export_run(workdir, str(tmp_path / "hf"), dtype="bfloat16")
  tensors = _tensors(out)
  assert all(t.dtype == jnp.bfloat16 for t in tensors.values())
  model = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert model.dtype == torch.bfloat16
  emb = model.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(emb, np.asarray(params["embed"][...].astype(jnp.bfloat16),
                                                np.float32))
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
  tokens = _tokens(6)
  diff = np.abs(_hf_logits(model.float(), tokens) - _our_logits(graphdef, bf16, tokens)).max()
  assert diff < 1e-4, diff


def test_tokenizer_json_import_and_init_from(llmjax_run, tmp_path, sp_tokenizer):
  workdir, _, params = llmjax_run
  out = export.export_run(workdir, str(tmp_path / "hf"))
  os.remove(os.path.join(out, "tokenizer.model"))  # leave only tokenizer.json
  run = load_run(import_.import_hf(out, str(tmp_path / "imp")))
  tok = run.tokenizer
  assert isinstance(tok, HFTokenizer) and isinstance(load_tokenizer(tok.path), HFTokenizer)
  assert tok.encode(SAMPLE, add_bos=True, add_eos=True) == sp_tokenizer.encode(
      SAMPLE, add_bos=True, add_eos=True)
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.special_token_ids == sp_tokenizer.special_token_ids
  assert tok.decode(tok.encode(SAMPLE, add_bos=True)) == SAMPLE
  assert pickle.loads(pickle.dumps(tok)).encode(SAMPLE) == tok.encode(SAMPLE)
  assert run.meta["chat_template"] == CHAT_TEMPLATE
  with pytest.raises(ConfigError, match="no token"):
    tok.token_id("<|nope|>")
  again = export.export_run(str(tmp_path / "imp"), str(tmp_path / "hf2"))  # HFTokenizer export
  hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(again)
  assert hf_tok(SAMPLE)["input_ids"] == sp_tokenizer.encode(SAMPLE, add_bos=True)
  assert hf_tok.chat_template == CHAT_TEMPLATE
  from llmjax.stages.context import RunContext
  ctx = RunContext(str(tmp_path / "next"))
  start = ctx.start(str(tmp_path / "imp"), run.model_cfg, "sft.init_from")
  assert ctx.tokenizer is not None and start.model_cfg == run.model_cfg


def test_failed_export_leaves_nothing(llmjax_run, tmp_path, monkeypatch):
  workdir = llmjax_run[0]

  def broken(tensors, directory, *args, **kwargs):
    next(iter(tensors))
    open(os.path.join(directory, "model.safetensors"), "wb").write(b"half")
    raise OSError("disk full")

  monkeypatch.setattr(export, "write_safetensors", broken)
  with pytest.raises(OSError, match="disk full"):
    export.export_run(workdir, str(tmp_path / "hf"))
  assert os.listdir(tmp_path) == []


# ---- refusals --------------------------------------------------------------------------------


@pytest.fixture
def hf_copy(hf_model, tmp_path):
  _, path, _ = hf_model
  return shutil.copytree(path, str(tmp_path / "hf"))


def _edit_config(path, **changes):
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)


def test_refuses_pickle_only_folder(hf_copy, tmp_path):
  os.remove(os.path.join(hf_copy, "model.safetensors"))
  with open(os.path.join(hf_copy, "pytorch_model.bin"), "wb") as f:
    f.write(b"not unpickled")
  with pytest.raises(CheckpointError, match="safe_serialization=True"):
    import_.import_hf(hf_copy, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_refuses_missing_shard(llmjax_run, tmp_path):
  out = export.export_run(llmjax_run[0], str(tmp_path / "hf"), max_shard_size="40KB")
  second = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[1]
  os.remove(os.path.join(out, second))
  with pytest.raises(CheckpointError, match=second):
    import_.import_hf(out, str(tmp_path / "out"))


def test_refuses_shape_mismatch(hf_copy, tmp_path):
  _edit_config(hf_copy, intermediate_size=128)
  with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape"):
    import_.import_hf(hf_copy, str(tmp_path / "out"))


@pytest.mark.parametrize("changes,match", [
    ({"architectures": ["MistralForCausalLM"]}, "LlamaForCausalLM, Qwen2ForCausalLM"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None},
     "rope_type='yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope_type='dynamic'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
])
def test_refuses_unsupported_config(hf_copy, tmp_path, changes, match):
  _edit_config(hf_copy, **changes)
  with pytest.raises(ConfigError, match=match):
    import_.import_hf(hf_copy, str(tmp_path / "out"))


def test_refuses_model_specific_fields(hf_model):
  kind, path, _ = hf_model
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  if kind == "llama3":
    bad, match = {**cfg, "attention_bias": True}, "attention_bias"
  else:
    bad = {**cfg, "use_sliding_window": True, "max_window_layers": 1,
           "layer_types": ["full_attention", "sliding_attention"]}
    match = "sliding"
  with pytest.raises(ConfigError, match=match):
    convert.config_from_hf(bad)


def _cli(*args):
  import subprocess
  import sys
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("llmjax_run", ["llama"], indirect=True)
def test_cli_import_generate_export(llmjax_run, tmp_path):
  hf = export.export_run(llmjax_run[0], str(tmp_path / "hf"))
  r = _cli("llmjax.cli.import_", f"--hf={hf}", f"--output={tmp_path / 'imp'}")
  assert r.returncode == 0, r.stderr
  r = _cli("llmjax.cli.generate", f"--workdir={tmp_path / 'imp'}", "--prompt=Alice has",
           "--max_new_tokens=4")
  assert r.returncode == 0 and "import checkpoint, step 0" in r.stderr, r.stderr
  r = _cli("llmjax.cli.export", f"--workdir={tmp_path / 'imp'}", f"--output={tmp_path / 'x'}",
           "--dtype=bfloat16", "--max_shard_size=40KB")
  assert r.returncode == 0, r.stderr
  assert os.path.isfile(tmp_path / "x" / "model.safetensors.index.json")
  with pytest.raises(ConfigError, match="already exists"):
    export.export_run(str(tmp_path / "imp"), hf)
