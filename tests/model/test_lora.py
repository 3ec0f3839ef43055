"""LoRA and QLoRA inside the model: exact identities, kernel equivalence, merging, bad config."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.errors import ConfigError
from llmjax.model import lora, quant, weights
from llmjax.model.transformer import build_model
from llmjax.train.optimizer import OptimizerConfig, decay_mask

from tests.conftest import TEST_MODEL

CFG = dataclasses.replace(TEST_MODEL, tie_embeddings=False)
ALL = lora.TARGET_MODULES
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 16)))


def perturbed(model, scale=0.05, seed=1):
  """The model with random B (a fresh adapter's B is 0, which would hide most bugs)."""
  graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(adapters))))
  adapters = jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape), adapters)
  return nnx.merge(graphdef, adapters, rest)


def lora_model(cfg=CFG, **kwargs):
  kwargs.setdefault("kernel", "xla")
  kwargs.setdefault("target_modules", ALL)
  return lora.add_lora(build_model(cfg), lora.LoraConfig(rank=4, **kwargs))


def set_kernel(model, kernel):
  for _, node in nnx.iter_graph(model):
    if isinstance(node, lora.LoraAdapter):
      node.kernel = kernel
  return model


def test_fresh_adapters_leave_the_model_exactly_as_it_was():
  base = build_model(CFG)(TOKENS)
  model = lora_model()
  np.testing.assert_array_equal(model(TOKENS), base)
  assert lora.has_lora(nnx.state(model)) and not lora.has_lora(nnx.state(build_model(CFG)))


def test_adapters_change_the_output_and_adapters_off_is_the_base_model():
  base = build_model(CFG)(TOKENS)
  model = perturbed(lora_model())
  assert float(jnp.abs(model(TOKENS) - base).max()) > 1e-2
  np.testing.assert_array_equal(lora.WithoutAdapters(model)(TOKENS), base)
  with lora.adapters_disabled():
    np.testing.assert_array_equal(model(TOKENS), base)


def test_lora_output_is_base_plus_scaled_low_rank_term():
  """One projection against the formula y = x W + (alpha / r) (x A) B, and rsLoRA's scale."""
  for rslora in (False, True):
    cfg = lora.LoraConfig(rank=4, alpha=8.0, use_rslora=rslora, kernel="xla",
                          target_modules=("up_proj",))
    assert cfg.scale == (8.0 / 2.0 if rslora else 8.0 / 4.0)
    model = perturbed(lora.add_lora(build_model(CFG), cfg))
    mlp = model.layers[0].mlp
    x = jax.random.normal(jax.random.key(3), (2, 5, CFG.d_model))
    from llmjax.model.transformer import project
    got = project(x, lora.weight(mlp, "up_proj"), "bsd,df->bsf", jnp.float32)
    a, b, w = mlp.up_proj_lora.a[...], mlp.up_proj_lora.b[...], mlp.up_proj[...]
    want = x @ w + cfg.scale * (x @ a) @ b
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def grads_of(model, kernel):
  graphdef, adapters, rest = nnx.split(set_kernel(model, kernel), nnx.LoRAParam, ...)

  def f(p):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, p, rest)(TOKENS)))
  return jax.value_and_grad(f)(adapters)


def test_pallas_kernel_equals_xla_in_values_and_gradients():
  model = perturbed(lora_model())
  (v_x, g_x), (v_p, g_p) = grads_of(model, "xla"), grads_of(model, "pallas")
  assert float(v_p) == pytest.approx(float(v_x), rel=1e-5)
  for gx, gp in zip(jax.tree.leaves(g_x), jax.tree.leaves(g_p)):
    scale = float(jnp.abs(gx).max())
    assert scale > 0
    np.testing.assert_allclose(gp, gx, atol=1e-4 * scale, rtol=0)


def test_only_adapters_have_gradients_and_the_base_is_untouched():
  model = perturbed(lora_model())
  graphdef, params = nnx.split(model, nnx.Param)  # LoRAParam is a Param: everything

  def f(p):
    return jnp.sum(nnx.merge(graphdef, p)(TOKENS) ** 2)
  grads = jax.grad(f)(params)
  flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(grads)}
  adapter_grads = [v for k, v in flat.items() if "_lora" in k]
  base_grads = [v for k, v in flat.items() if "_lora" not in k and "proj" in k
                and "norm" not in k]
  assert adapter_grads and all(float(jnp.abs(g[...]).max()) > 0 for g in adapter_grads)
  # The base weights are behind stop_gradient: they never train, even under a Param filter.
  assert base_grads and all(float(jnp.abs(g[...]).max()) == 0 for g in base_grads)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_qlora_equals_dequantized_base_plus_lora(scheme):
  qcfg = quant.QuantConfig(scheme, 32, "pallas")
  base = build_model(CFG)
  quant.quantize_model(base, qcfg)
  model = perturbed(lora.add_lora(base, lora.LoraConfig(rank=4, kernel="xla",
                                                         target_modules=ALL)))
  got = model(TOKENS)
  # The same adapters on a float model whose weights are the dequantized codes.
  reference = perturbed(lora_model())
  names = weights.ATTENTION + weights.MLP
  for (owner, attr, _), (ref_owner, _, _) in zip(weights.projection_weights(model, names),
                                                 weights.projection_weights(reference, names)):
    getattr(ref_owner, attr).set_value(getattr(owner, attr).get_value().dequantize())
  np.testing.assert_allclose(got, reference(TOKENS), atol=2e-4, rtol=1e-4)
  # ... and the quantized weights are frozen (not LoRAParams, not Params).
  trainable = nnx.state(model, nnx.LoRAParam)
  assert all("_lora" in "/".join(map(str, k)) for k, _ in nnx.to_flat_state(trainable))


@pytest.mark.parametrize("quantize", [False, True])
def test_merge_gives_a_plain_model_with_the_same_logits(quantize):
  model = build_model(CFG)
  if quantize:
    quant.quantize_model(model, quant.QuantConfig("nf4", 32, "reference"))
  # QLoRA adapting a few weights: the others must be dequantized by the merge too.
  targets = ("q_proj", "up_proj") if quantize else ALL
  model = perturbed(lora.add_lora(model, lora.LoraConfig(rank=4, kernel="xla",
                                                         target_modules=targets)))
  want = model(TOKENS)
  merged = lora.merge_lora(model)
  assert not lora.has_lora(nnx.state(merged))
  # Its state restores into a freshly built plain model.
  plain = build_model(CFG)
  nnx.update(plain, nnx.state(merged))
  np.testing.assert_allclose(plain(TOKENS), want, atol=1e-4, rtol=1e-5)


def test_dropout_acts_only_under_a_key_and_differs_between_layers():
  model = perturbed(lora_model(dropout=0.5, target_modules=("q_proj",)))
  plain = model(TOKENS)
  with lora.dropout_key(jax.random.key(0)):
    a = model(TOKENS)
  with lora.dropout_key(jax.random.key(0)):
    b = model(TOKENS)
  with lora.dropout_key(jax.random.key(1)):
    c = model(TOKENS)
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - plain).max()) > 0 and float(jnp.abs(a - c).max()) > 0
  # Under scan_layers each layer folds in its index; the result equals the unrolled model
  # only in expectation, but it must still be deterministic and not equal to no-dropout.
  scanned = dataclasses.replace(CFG, scan_layers=True)
  model_s = perturbed(lora_model(scanned, dropout=0.5, target_modules=("q_proj",)))
  with lora.dropout_key(jax.random.key(0)):
    s = model_s(TOKENS)
  assert float(jnp.abs(s - model_s(TOKENS)).max()) > 0


@pytest.mark.parametrize("kwargs,match", [
    ({"target_modules": ("q_proj", "query")}, r"\['query'\] unknown; valid names are q_proj"),
    ({"target_modules": ()}, "target_modules is empty"),
    ({"rank": 0}, "rank must be at least 1"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"kernel": "cuda"}, "kernel must be one of"),
])
def test_bad_lora_config_is_refused_with_what_to_do(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    lora.LoraConfig(**kwargs)


def test_lora_on_a_tied_head_is_refused():
  tied = dataclasses.replace(CFG, tie_embeddings=True)
  with pytest.raises(ConfigError, match="ties it to the token embedding"):
    lora.add_lora(build_model(tied), lora.LoraConfig(target_modules=("lm_head",)))


def test_adapters_carry_logical_axes_for_the_mesh_rules():
  model = lora_model()
  attn = model.layers[0].attn
  assert attn.q_proj_lora.a.get_metadata()["logical_axes"] == ("embed", lora.RANK_AXIS)
  assert attn.q_proj_lora.b.get_metadata()["logical_axes"] == (lora.RANK_AXIS, "heads",
                                                               "head_dim")
  assert attn.o_proj_lora.a.shape == (CFG.n_heads, CFG.resolved_head_dim, 4)
  # peft's init: A ~ U(+-1/sqrt(d_in)), B = 0.
  a = np.asarray(model.layers[0].mlp.down_proj_lora.a[...])
  bound = 1 / math.sqrt(CFG.d_ff)
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound


def test_weight_decay_skips_biases_norms_and_optionally_embeddings():
  qwen = dataclasses.replace(CFG, qkv_bias=True)
  model = lora.add_lora(build_model(qwen), lora.LoraConfig(rank=4, target_modules=ALL))
  params = nnx.state(model, nnx.Param)

  def decayed(cfg):
    mask = decay_mask({"policy": params}, cfg)
    return {"/".join(map(str, k)): bool(v.get_value())
            for k, v in nnx.to_flat_state(mask["policy"])}
  on = decayed(OptimizerConfig())
  assert on["layers/0/attn/q_bias"] is False and on["layers/0/attn/k_bias"] is False
  assert on["layers/0/input_norm/weight"] is False and on["final_norm/weight"] is False
  assert on["layers/0/attn/q_proj"] and on["lm_head"] and on["embed"]
  assert on["layers/0/attn/q_proj_lora/a"] and on["layers/1/mlp/down_proj_lora/b"]
  off = decayed(OptimizerConfig(decay_embeddings=False))
  assert off["embed"] is False and off["lm_head"] is True


@pytest.mark.parametrize("variant", [{"remat": "full"}, {"remat": "dots"},
                                     {"scan_layers": True, "remat": "dots_no_batch"}])
def test_remat_and_scan_give_the_same_lora_gradients(variant):
  """Adapters under grad with the frozen base outside it: every speed switch must trace."""
  def adapter_grads(cfg):
    base = build_model(cfg)
    quant.quantize_model(base, quant.QuantConfig("nf4", 32, "reference"))
    model = perturbed(lora.add_lora(base, lora.LoraConfig(rank=4, kernel="xla",
                                                          target_modules=ALL)))
    return grads_of(model, "xla")
  (v, g), (v_ref, g_ref) = adapter_grads(dataclasses.replace(CFG, **variant)), \
      adapter_grads(CFG)
  # Scanned blocks fuse the NF4 decode differently: float32 rounding, a few ulps.
  assert float(v) == pytest.approx(float(v_ref), rel=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.abs(b).max()), rtol=0)
