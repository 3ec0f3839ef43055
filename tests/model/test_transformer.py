"""Model equivalences: causality, GQA vs multi-head, packed vs separate, RoPE scaling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.errors import ConfigError
from llmjax.model import attention
from llmjax.model.config import PRESETS, ModelConfig, RopeScaling, model_config
from llmjax.model.transformer import build_model, logical_axes, rope_frequencies
from flax import nnx

TINY = dataclasses.replace(PRESETS["tiny"], vocab_size=101, d_model=64, d_ff=96)


@pytest.fixture(scope="module")
def model():
  return build_model(TINY, seed=1)


def test_param_count_matches_config(model):
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == TINY.num_params()


def test_real_preset_sizes():
  # Published sizes: Llama-3.2-1B 1.236B, Llama-3-8B 8.03B, Qwen2.5-0.5B 494M parameters.
  assert PRESETS["llama3_1b"].num_params() == 1_235_814_400
  assert PRESETS["llama3_8b"].num_params() == 8_030_261_248
  assert PRESETS["qwen2_5_0_5b"].num_params() == 494_032_768


def test_every_param_has_logical_axes(model):
  state = nnx.state(model, nnx.Param)
  axes = jax.tree.leaves(logical_axes(state), is_leaf=lambda x: isinstance(x, tuple))
  shapes = jax.tree.leaves(state)
  assert len(axes) == len(shapes)
  for a, p in zip(axes, shapes):
    assert len(a) == p.ndim
    assert set(a) <= {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm"}


def test_causality(model):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, TINY.vocab_size, (2, 24))
  changed = tokens.copy()
  changed[:, 15:] = (changed[:, 15:] + 7) % TINY.vocab_size
  a, b = model(jnp.asarray(tokens)), model(jnp.asarray(changed))
  np.testing.assert_allclose(a[:, :15], b[:, :15], atol=1e-6)
  assert np.abs(np.asarray(a[:, 15:] - b[:, 15:])).max() > 1e-3  # the future did change


def _multi_head_reference(q, k, v):
  """Textbook per-head causal softmax(QK^T/sqrt(d))V with k, v repeated to every q head."""
  b, s, n, h = q.shape
  rep = n // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  out = np.zeros_like(q)
  for head in range(n):
    scores = np.einsum("bsh,bth->bst", q[:, :, head], k[:, :, head]) / np.sqrt(h)
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out[:, :, head] = np.einsum("bst,bth->bsh", p, v[:, :, head])
  return out


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_grouped_query_attention_equals_multi_head(kv_heads):
  rng = np.random.default_rng(kv_heads)
  q = rng.normal(size=(2, 9, 4, 8)).astype(np.float32)
  k = rng.normal(size=(2, 9, kv_heads, 8)).astype(np.float32)
  v = rng.normal(size=(2, 9, kv_heads, 8)).astype(np.float32)
  got = attention.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  np.testing.assert_allclose(got, _multi_head_reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_packed_forward_equals_each_document_alone(model):
  rng = np.random.default_rng(3)
  docs = [rng.integers(1, TINY.vocab_size, n) for n in (5, 9, 4)]
  row = np.zeros(24, np.int32)
  seg = np.zeros(24, np.int32)
  pos = np.zeros(24, np.int32)
  start = 0
  for i, d in enumerate(docs):
    row[start:start + len(d)], seg[start:start + len(d)] = d, i + 1
    pos[start:start + len(d)] = np.arange(len(d))
    start += len(d)
  # Jitted: op by op, the four forwards took 10 s of the suite.
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda *args: nnx.merge(graphdef, state)(*args))
  packed = forward(jnp.asarray(row[None]), jnp.asarray(pos[None]), jnp.asarray(seg[None]))
  start = 0
  for d in docs:
    alone = forward(jnp.asarray(d[None]))
    np.testing.assert_allclose(packed[0, start:start + len(d)], alone[0], atol=2e-5)
    start += len(d)
  assert np.isfinite(np.asarray(packed)).all()  # padding rows too


def test_llama3_rope_scaling_matches_reference_formula():
  # Hugging Face `_compute_llama3_parameters`, written out independently in float64.
  s = RopeScaling(32.0, 1.0, 4.0, 8192)
  got = rope_frequencies(64, 500_000.0, s)
  base = 1.0 / (500_000.0 ** (np.arange(0, 64, 2) / 64))
  expected = []
  for f in base:
    wavelen = 2 * np.pi / f
    if wavelen < 8192 / 4.0:
      expected.append(f)
    elif wavelen > 8192 / 1.0:
      expected.append(f / 32.0)
    else:
      smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
      expected.append((1 - smooth) * f / 32.0 + smooth * f)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert not np.allclose(got, base)  # scaling did something


def test_qwen2_bias_and_tied_embeddings():
  cfg = dataclasses.replace(TINY, qkv_bias=True, tie_embeddings=True)
  m = build_model(cfg)
  state = nnx.state(m, nnx.Param)
  assert "lm_head" not in state and "q_bias" in state["layers"][0]["attn"]
  assert sum(x.size for x in jax.tree.leaves(state)) == cfg.num_params()
  logits = m(jnp.ones((1, 4), jnp.int32))
  assert logits.shape == (1, 4, cfg.vocab_size)


def _dot_generals(jaxpr, out=None):
  """(operand dtypes, result dtype) of every dot_general, nested jaxprs (custom VJPs) included."""
  out = [] if out is None else out
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append((tuple(str(v.aval.dtype) for v in eqn.invars), str(eqn.outvars[0].aval.dtype)))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          _dot_generals(sub, out)
  return out


def test_bf16_compute_keeps_fp32_params_and_logits():
  cfg = dataclasses.replace(TINY, dtype="bfloat16")
  m = build_model(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 101, (2, 16)))
  # Every matmul (q, k, v, o, gate, up, down and both attention products per layer, and the
  # logits) multiplies bf16 operands; only the logits come out in float32.
  dots = _dot_generals(jax.make_jaxpr(m)(tokens).jaxpr)
  assert len(dots) == 9 * cfg.n_layers + 1
  assert all(operands == ("bfloat16", "bfloat16") for operands, _ in dots), dots
  assert m.hidden_states(tokens).dtype == jnp.bfloat16
  lo, hi = m(tokens), build_model(TINY)(tokens)
  assert lo.dtype == jnp.float32
  # Measured: max |bf16 - fp32| is 0.5% of max |logit| (bf16 keeps 8 bits: 2^-8 = 0.4%);
  # float32 compute would differ by ~1e-7. The floor fails if bf16 is silently ignored, the
  # ceiling if something computes in less than bf16 or is plain wrong.
  err = float(jnp.max(jnp.abs(lo - hi)) / jnp.max(jnp.abs(hi)))
  assert 1e-3 < err < 0.03, err


def test_config_errors_name_the_field():
  with pytest.raises(ConfigError, match="n_kv_heads"):
    dataclasses.replace(TINY, n_kv_heads=3)
  with pytest.raises(ConfigError, match="unknown field.*n_layer"):
    model_config("tiny", {"n_layer": 4})
  with pytest.raises(ConfigError, match="unknown model preset"):
    model_config("llama9")


def test_config_json_round_trip():
  cfg = PRESETS["llama3_1b"]
  import json
  assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
