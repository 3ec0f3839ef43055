"""The mixture-of-experts MLP against plain references: a dense loop over the experts, the
Switch / ST-MoE loss formulas (and transformers' implementation), hand-built overflow."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.errors import ConfigError
from llmjax.model import moe, router_losses
from llmjax.model.config import PRESETS, ModelConfig
from llmjax.model.transformer import build_model

# d 32, 4 experts of width 16, top-2; a wide init so routing is decisive.
SMALL = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48,
                    n_experts=4, n_experts_per_token=2, d_ff_expert=16, init_std=0.3)
SHARED = dataclasses.replace(SMALL, d_ff_shared=24, shared_expert_gate=True,
                             norm_topk_prob=False)


def make_moe(cfg, seed=0):
  return moe.MoE(cfg, rngs=nnx.Rngs(params=seed))


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_swiglu_ffn(x, wg, wu, wd):
  g, u = x @ wg, x @ wu
  return (g / (1 + np.exp(-g)) * u) @ wd


def np_moe(params, x, k, normalize, keep=None):
  """Per token, in float64: top-k of the softmax router, each expert's FFN, weighted sum;
  `keep [tokens, k]` switches assignments off."""
  p = {name: np.asarray(v, np.float64) for name, v in params.items()}
  x = np.asarray(x, np.float64)
  probs = np_softmax(x @ p["router"])
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    top = np.argsort(-probs[t], kind="stable")[:k]
    w = probs[t, top] / (probs[t, top].sum() if normalize else 1.0)
    for j, e in enumerate(top):
      if keep is None or keep[t, j]:
        out[t] += w[j] * np_swiglu_ffn(x[t], p["gate_proj"][e], p["up_proj"][e],
                                       p["down_proj"][e])
  if "shared_gate" in p:
    s = np_swiglu_ffn(x, p["shared/gate_proj"], p["shared/up_proj"], p["shared/down_proj"])
    out += s / (1 + np.exp(-(x @ p["shared_gate"])))
  return out


def flat_params(module):
  state = nnx.state(module, nnx.Param)
  return {"/".join(str(k) for k in path): v[...] for path, v in nnx.to_flat_state(state)}


def jnp_dense_loop(params, x, k, normalize):
  """The same MoE written as a dense loop over every expert with a gate that is zero off
  the top-k: differentiable, with no sorting, grouping or ragged matmul."""
  probs = jax.nn.softmax(x @ params["router"], axis=-1)
  top_w, top_i = jax.lax.top_k(probs, k)
  if normalize:
    top_w = top_w / top_w.sum(-1, keepdims=True)
  gate = jnp.sum(jax.nn.one_hot(top_i, probs.shape[-1]) * top_w[..., None], axis=1)  # [T, E]
  out = 0
  for e in range(probs.shape[-1]):
    g, u = x @ params["gate_proj"][e], x @ params["up_proj"][e]
    out = out + gate[:, e:e + 1] * ((jax.nn.silu(g) * u) @ params["down_proj"][e])
  if "shared_gate" in params:
    g, u = x @ params["shared/gate_proj"], x @ params["shared/up_proj"]
    out = out + jax.nn.sigmoid(x @ params["shared_gate"]) * (
        (jax.nn.silu(g) * u) @ params["shared/down_proj"])
  return out


@pytest.mark.parametrize("cfg", [SMALL, SHARED], ids=["mixtral_like", "qwen_like_shared"])
def test_dropless_moe_equals_a_dense_loop_in_values_and_gradients(cfg):
  layer = make_moe(cfg)
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (3, 5, cfg.d_model))
  out, stats = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  ref = np_moe(flat_params(layer), np.asarray(x).reshape(15, -1), cfg.n_experts_per_token,
               cfg.norm_topk_prob)
  np.testing.assert_allclose(np.asarray(out).reshape(15, -1), ref, rtol=2e-5, atol=2e-6)
  assert float(stats.dropped) == 0 and float(stats.tokens) == 15

  # Gradients with respect to every parameter and the input, against the dense loop.
  cot = jax.random.normal(jax.random.key(2), out.shape)

  def ours(state, x):
    return jnp.sum(nnx.merge(graphdef, state)(x)[0] * cot)

  def dense(params, x):
    return jnp.sum(jnp_dense_loop(params, x.reshape(15, -1), cfg.n_experts_per_token,
                                  cfg.norm_topk_prob).reshape(cot.shape) * cot)
  g_state, g_x = jax.jit(jax.grad(ours, argnums=(0, 1)))(state, x)
  r_params, r_x = jax.jit(jax.grad(dense, argnums=(0, 1)))(flat_params(layer), x)
  np.testing.assert_allclose(g_x, r_x, rtol=1e-4, atol=1e-6)
  got = {"/".join(str(k) for k in path): v[...] for path, v in nnx.to_flat_state(g_state)}
  assert set(got) == set(r_params)
  for name, g in got.items():
    scale = float(jnp.abs(r_params[name]).max())
    assert scale > 0, name  # every parameter is reached (the router through the weights)
    np.testing.assert_allclose(g, r_params[name], rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def test_parameter_layout_is_the_contract_hf_conversion_codes_against():
  layer = make_moe(SHARED)
  shapes = {name: (tuple(v.shape), v.get_metadata()["logical_axes"]) for name, v in
            [("/".join(str(k) for k in p), v) for p, v in nnx.to_flat_state(nnx.state(layer))]}
  d, e, f, s = 32, 4, 16, 24
  assert shapes == {
      "router": ((d, e), ("embed", None)),
      "gate_proj": ((e, d, f), ("expert", "embed", "mlp")),
      "up_proj": ((e, d, f), ("expert", "embed", "mlp")),
      "down_proj": ((e, f, d), ("expert", "mlp", "embed")),
      "shared/gate_proj": ((d, s), ("embed", "mlp")),
      "shared/up_proj": ((d, s), ("embed", "mlp")),
      "shared/down_proj": ((s, d), ("mlp", "embed")),
      "shared_gate": ((d, 1), ("embed", None)),
  }


def routed_layer(first, second):
  """A 4-expert top-2 layer whose router sends token t to experts (first[t], second[t]),
  in that order: x_t is one-hot on d-axis t and the router's row t scores the experts."""
  t = len(first)
  cfg = dataclasses.replace(SMALL, d_model=32, norm_topk_prob=True)
  layer = make_moe(cfg)
  router = np.full((32, 4), -4.0, np.float32)
  for i, (a, b) in enumerate(zip(first, second)):
    router[i, a], router[i, b] = 4.0, 2.0
  layer.router.set_value(jnp.asarray(router))
  x = np.zeros((1, t, 32), np.float32)
  x[0, np.arange(t), np.arange(t)] = 1.0
  return layer, jnp.asarray(x)


def test_capacity_drops_exactly_the_overflowing_assignments():
  # 6 tokens x top-2 over 4 experts at capacity factor 1: ceil(6 * 2 / 4) = 3 slots each.
  # First choices outrank second choices; within a rank earlier tokens win. Expert 0 is
  # everyone's first choice but token 3's (expert 2): it keeps tokens 0, 1, 2; tokens 4 and 5
  # lose it. Token 3's second choice, expert 0, is full too. Expert 1 is the second choice
  # of tokens 0-2, 4, 5: it keeps 0, 1, 2 (its 3 slots); 4, 5 lose theirs as well.
  first, second = [0, 0, 0, 2, 0, 0], [1, 1, 1, 0, 1, 1]
  layer, x = routed_layer(first, second)
  assert moe.capacity(6, 2, 4, 1.0) == 3
  keep = np.array([[1, 1], [1, 1], [1, 1], [1, 0], [0, 0], [0, 0]], bool)
  layer.capacity_factor = 1.0  # a numerics field: no parameter changes
  graphdef, state = nnx.split(layer)

  @functools.partial(jax.jit, static_argnames="dropless")
  def capped(x, segment_ids=None, dropless=False):
    return nnx.merge(graphdef, state)(x, segment_ids, dropless)
  out, stats = capped(x)
  ref = np_moe(flat_params(layer), np.asarray(x)[0], 2, True, keep=keep)
  np.testing.assert_allclose(np.asarray(out)[0], ref, rtol=2e-5, atol=1e-6)
  assert np.abs(ref[4:]).max() == 0 and np.abs(ref[:4]).min(axis=1).max() > 0
  assert float(stats.dropped) == 5
  # The same layer dropless computes every assignment.
  full, _ = capped(x, dropless=True)
  np.testing.assert_allclose(np.asarray(full)[0], np_moe(flat_params(layer),
                                                         np.asarray(x)[0], 2, True),
                             rtol=2e-5, atol=1e-6)
  # Padding takes no slot: with token 0 padding, expert 0 keeps 1, 2 and 4, expert 1 keeps
  # 1, 2, 4 (token 5 still overflows both), and token 0 itself gets nothing.
  out, stats = capped(x, jnp.asarray([[0, 1, 1, 1, 1, 1]]))
  keep = np.array([[0, 0], [1, 1], [1, 1], [1, 0], [1, 1], [0, 0]], bool)
  ref = np_moe(flat_params(layer), np.asarray(x)[0], 2, True, keep=keep)
  np.testing.assert_allclose(np.asarray(out)[0], ref, rtol=2e-5, atol=1e-6)
  assert float(stats.dropped) == 3 and float(stats.tokens) == 5


def test_router_losses_against_the_papers_formulas_and_transformers():
  torch = pytest.importorskip("torch")
  from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
  rng = np.random.default_rng(0)
  layers = [rng.normal(size=(10, 6)).astype(np.float32) * 2 for _ in range(3)]
  valid = np.ones(10, bool)
  valid[[2, 7]] = False  # padding: left out of both losses
  k = 2
  stats = None
  for logits in layers:
    _, experts = moe.route(jnp.asarray(logits), k, True)
    stats = router_losses.add_stats(stats, router_losses.router_stats(
        jnp.asarray(logits), experts, jnp.asarray(valid)))
  # By hand: over every layer's valid tokens, f_e = top-k assignments per token, P_e = mean
  # probability; E * sum f_e P_e. z: mean logsumexp^2.
  logits = np.concatenate([z[valid] for z in layers]).astype(np.float64)
  probs = np_softmax(logits)
  top = np.argsort(-probs, axis=1)[:, :k]
  f = np.array([(top == e).sum() for e in range(6)]) / len(logits)
  lb = 6 * np.sum(f * probs.mean(0))
  lse = np.log(np.exp(logits).sum(1))
  assert float(router_losses.load_balancing_loss(stats)) == pytest.approx(lb, rel=1e-5)
  assert float(router_losses.z_loss(stats)) == pytest.approx(np.mean(lse ** 2), rel=1e-5)
  hf = load_balancing_loss_func(tuple(torch.tensor(z) for z in layers), 6, k,
                                torch.tensor(valid[None].astype(np.int64)))
  assert float(router_losses.load_balancing_loss(stats)) == pytest.approx(float(hf), rel=1e-5)
  # Metrics: each layer's busiest expert over the mean load, averaged over the layers.
  metrics = router_losses.router_metrics([router_losses._Recorded(stats, 0.01, 0.0, k)])
  busiest = [6 * max((np.argsort(-np_softmax(z[valid].astype(np.float64)), axis=1)[:, :k] == e)
                     .sum() for e in range(6)) / (valid.sum() * k) for z in layers]
  s_, c_ = metrics["moe/max_load"]
  assert float(s_ / c_) == pytest.approx(np.mean(busiest), rel=1e-5)
  assert float(metrics["moe/load_e1"][0] / metrics["moe/load_e1"][1]) == pytest.approx(f[1] / k)
  # Perfect balance gives k (Switch's 1 at top-1): uniform probabilities, equal loads.
  even = router_losses.RouterStats(jnp.full((4,), 2.0), jnp.full((4,), 1.0), jnp.zeros(()),
                                   jnp.asarray(4.0), jnp.zeros(()), jnp.asarray(2.0))
  assert float(router_losses.load_balancing_loss(even)) == pytest.approx(2.0)


def test_router_loss_reaches_the_gradient_and_metrics_through_the_loop():
  from llmjax.train import loop
  from llmjax.train.losses import lm_objective
  cfg = dataclasses.replace(PRESETS["tiny_moe"], d_model=64, n_heads=4, vocab_size=128,
                            d_ff_expert=32, router_z_loss_coef=1e-3)
  graphdef, params = nnx.split(build_model(cfg, seed=0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 128, (2, 16)), jnp.int32)
  segments = jnp.asarray(np.repeat([[1] * 12 + [0] * 4], 2, 0), jnp.int32)
  batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "segment_ids": segments,
           "positions": jnp.broadcast_to(jnp.arange(16), (2, 16)),
           "loss_mask": jnp.ones((2, 16), jnp.int32)}

  def run(cfg, train=True):
    g = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))[0]
    def f(p):
      out = loop._call_loss(lm_objective(), {"policy": nnx.merge(g, p)}, batch, train)
      return out[0] / out[1], out
    if not train:  # evaluation: no gradient
      return None, jax.jit(lambda p: f(p)[1])(params)
    return jax.jit(jax.grad(f, has_aux=True))(params)
  grads, (loss_sum, count, aux) = run(cfg)
  no_aux = dataclasses.replace(cfg, router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
  grads0, (loss_sum0, _, aux0) = run(no_aux)
  router = lambda g: np.asarray(g["layers"][0]["mlp"]["router"][...])
  # The task loss alone vs with the router losses: the difference is exactly the weighted
  # router losses (the aux metrics are the uncoefficiented means of this one forward pass).
  penalty = (cfg.router_aux_loss_coef * aux["moe/load_balancing_loss"][0]
             + cfg.router_z_loss_coef * aux["moe/z_loss"][0])
  assert float(loss_sum - loss_sum0) == pytest.approx(float(penalty * count), rel=1e-4)
  assert float(count) == 24  # padding is not a target
  assert np.abs(router(grads) - router(grads0)).max() > 1e-3 * np.abs(router(grads0)).max()
  # Expert weights' gradients are untouched by the router losses (only the router and what
  # feeds it are).
  np.testing.assert_allclose(grads["layers"][1]["mlp"]["down_proj"][...],
                             grads0["layers"][1]["mlp"]["down_proj"][...], rtol=1e-5, atol=1e-9)
  # Metrics: loads over the 24 valid tokens x top-2 x 2 layers sum to 1 across experts.
  loads = sum(float(aux[f"moe/load_e{i}"][0] / aux[f"moe/load_e{i}"][1]) for i in range(8))
  assert loads == pytest.approx(1.0) and float(aux["moe/load_e0"][1]) == 24 * 2 * 2
  assert 1.0 <= float(aux["moe/max_load"][0]) <= 8.0
  # Evaluation: the task loss alone, the metrics still there.
  _, (eval_sum, _, eval_aux) = run(cfg, train=False)
  assert float(eval_sum) == pytest.approx(float(loss_sum0), rel=1e-6)
  assert "moe/z_loss" in eval_aux


@pytest.mark.parametrize("overrides, message", [
    ({"n_experts_per_token": 5}, "n_experts_per_token .top-k. must be between 1 and n_experts"),
    ({"n_experts_per_token": 0}, "must be between 1 and n_experts"),
    ({"d_ff_expert": -1}, "d_ff_expert must be positive"),
    ({"d_ff_shared": -8}, "d_ff_shared must be >= 0"),
    ({"shared_expert_gate": True}, "shared_expert_gate gates the shared expert"),
    ({"moe_capacity_factor": -1.0}, "moe_capacity_factor must be >= 0"),
    ({"router_aux_loss_coef": -0.1}, "router_aux_loss_coef must be >= 0"),
    ({"n_experts": -2}, "n_experts must be >= 0"),
    ({"n_experts": 0, "d_ff_shared": 64}, "d_ff_shared only apply to a mixture of experts"),
])
def test_bad_moe_configs_are_refused(overrides, message):
  with pytest.raises(ConfigError, match=message):
    dataclasses.replace(SMALL, **overrides)


def test_moe_refuses_what_it_cannot_do():
  from llmjax.model import lora, quant
  with pytest.raises(ConfigError, match="n_experts=8 does not split over MeshConfig.expert=3"):
    moe.check_parallelism(PRESETS["tiny_moe"], expert=3)
  with pytest.raises(ConfigError, match="cannot be pipelined .MeshConfig.stage=2"):
    moe.check_parallelism(PRESETS["tiny_moe"], expert=2, stage=2)
  moe.check_parallelism(PRESETS["tiny"], expert=3, stage=2)  # dense: nothing to check
  model = build_model(dataclasses.replace(SMALL, n_layers=1))
  with pytest.raises(ConfigError, match=r"names \['gate_proj', 'up_proj', 'down_proj'\]"):
    lora.add_lora(model, lora.LoraConfig())
  lora.add_lora(model, lora.LoraConfig(target_modules=("q_proj", "v_proj")))  # attention: ok
  assert lora.has_lora(model)
  with pytest.raises(ConfigError, match="quantizing a mixture-of-experts model"):
    quant.quantize_model(build_model(SMALL), quant.QuantConfig())


def test_parameter_counts_match_the_model_and_the_published_numbers():
  for cfg in (PRESETS["tiny_moe"], SHARED, dataclasses.replace(SHARED, tie_embeddings=True)):
    state = nnx.state(nnx.eval_shape(lambda: build_model(cfg)), nnx.Param)
    assert cfg.num_params() == sum(math.prod(x.shape) for x in jax.tree.leaves(state))
  # Active: one token's top-k experts, the router and the shared expert (and gate).
  c = SHARED
  per_expert = 3 * c.d_model * c.resolved_d_ff_expert
  assert c.num_params() - c.num_active_params() == c.n_layers * 2 * per_expert
  assert PRESETS["tiny"].num_active_params() == PRESETS["tiny"].num_params()
  # Mixtral-8x7B: "46.7B total parameters ... 12.9B parameters per token" (Mistral AI's
  # release post and model card). Qwen1.5-MoE-A2.7B: "14.3B parameters in total and 2.7B
  # activated parameters during runtime" (its model card), of which "2.0B" non-embedding
  # (Qwen's blog post). Both count the input embedding and the untied lm_head whole, in
  # total and active alike; rounded to 0.1B they match exactly:
  #   Mixtral: 46,702,792,704 total, 12,879,925,248 active.
  #   Qwen1.5-MoE: 14,315,784,192 total, 2,689,173,504 active (2,066,843,648 without the
  #   two 311M vocab matrices).
  mixtral, qwen = PRESETS["mixtral_8x7b"], PRESETS["qwen1_5_moe_a2_7b"]
  assert round(mixtral.num_params() / 1e9, 1) == 46.7
  assert round(mixtral.num_active_params() / 1e9, 1) == 12.9
  assert round(qwen.num_params() / 1e9, 1) == 14.3
  assert round(qwen.num_active_params() / 1e9, 1) == 2.7
  assert 2.0e9 <= qwen.num_active_params(include_embeddings=False) < 2.1e9  # "2.0B"
  assert mixtral.num_params() == 46_702_792_704 and qwen.num_params() == 14_315_784_192


def test_flops_per_token_count_active_parameters():
  from llmjax import metrics
  cfg = PRESETS["mixtral_8x7b"]
  attention = 12 * 32 * 32 * 128 * 4096
  expected = 6 * (cfg.num_active_params(include_embeddings=False) + 4096 * 32_000) + attention
  assert metrics.flops_per_token(cfg, 4096) == expected


# A 64-wide tiny_moe: 8 experts of width 32, top-2, both router losses on.
TINY = dataclasses.replace(PRESETS["tiny_moe"], d_model=64, n_heads=4, d_ff_expert=32,
                           router_z_loss_coef=1e-3)


def lm_batch(rows=2, seq=16, vocab=512, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, vocab, (rows, seq)), jnp.int32)
  return {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1),
          "segment_ids": jnp.asarray(np.repeat([[1] * (seq - 5) + [2] * 3 + [0] * 2], rows, 0),
                                     jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(seq), (rows, seq)),
          "loss_mask": jnp.ones((rows, seq), jnp.int32)}


def test_scan_layers_and_remat_give_the_plain_loss_router_losses_and_gradients():
  # The router statistics leave lax.scan and jax.checkpoint explicitly; a lost or doubled
  # layer would change the router loss.
  from llmjax.train import loop
  from llmjax.train.losses import lm_objective
  params = nnx.split(build_model(TINY, seed=0))[1]
  batch = lm_batch()

  def run(cfg):
    graphdef = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))[0]
    def f(p):
      loss_sum, count, aux = loop._call_loss(lm_objective(), {"policy": nnx.merge(graphdef, p)},
                                             batch)
      return loss_sum / count, aux
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  (ref_loss, ref_aux), ref_grads = run(TINY)
  for variant in ({"scan_layers": True, "remat": "full"}, {"remat": "dots"}):
    (loss, aux), grads = run(dataclasses.replace(TINY, **variant))
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6), variant
    for name in ("moe/load_balancing_loss", "moe/z_loss", "moe/load_e3"):
      assert float(aux[name][0]) == pytest.approx(float(ref_aux[name][0]), rel=1e-5), name
      assert float(aux[name][1]) == float(ref_aux[name][1]), name
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_frozen_roles_and_adapters_off_record_no_router_losses():
  from llmjax.model import lora
  from llmjax.train import roles
  graphdef, state = nnx.split(build_model(SMALL))
  tokens = lm_batch(vocab=SMALL.vocab_size)["tokens"]
  recorded = []

  def forward_passes(state):
    model = nnx.merge(graphdef, state)
    with router_losses.recording() as records:
      model(tokens)
      roles.Frozen(model)(tokens)
      lora.WithoutAdapters(model)(tokens)
      roles.Frozen(model).hidden_states(tokens)
    recorded.append(len(records))
  jax.eval_shape(forward_passes, state)  # recording happens while tracing
  assert recorded == [1]


def test_kv_cache_generation_equals_full_recomputation():
  from llmjax.sample.sampler import Sampler
  from llmjax.train.loop import init_params
  # A wide init: decisive routing and logits, so float reassociation flips nothing.
  graphdef, params = init_params(dataclasses.replace(TINY, init_std=0.2), seed=0)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(4, 512, size=n).tolist() for n in (5, 13, 9)]
  out = Sampler(graphdef, params, eos_ids=[]).sample(prompts, max_new_tokens=8)
  forward = jax.jit(lambda p, t: jax.nn.log_softmax(nnx.merge(graphdef, p)(t)[0], axis=-1))
  for i, prompt in enumerate(prompts):
    full = prompt + out.completion(i)
    logp = forward(params, jnp.asarray([full + [0] * (32 - len(full))]))
    # Greedy: each generated token is the recomputation's argmax, with its log-prob.
    steps = [logp[len(prompt) - 1 + t] for t in range(len(out.completion(i)))]
    assert out.completion(i) == [int(jnp.argmax(s)) for s in steps]
    np.testing.assert_allclose(out.logprobs[i, 0], [float(s[tok]) for s, tok in
                                                    zip(steps, out.completion(i))], atol=2e-5)


@pytest.mark.parametrize("path", ["ragged", "blocks", "buffer"])
def test_every_expert_path_computes_its_local_experts_kept_assignments(path):
  # 4 experts, this device holding experts 2 and 3; some assignments dropped. The three ways
  # to run experts (ragged_dot: GPU/TPU dropless; blocks: CPU dropless; the capacity buffer)
  # against a per-assignment numpy loop, values and gradients.
  rng = np.random.default_rng(0)
  t, k, d, f = 37, 2, 8, 6
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  experts = jnp.asarray(np.stack([rng.permutation(4)[:k] for _ in range(t)]), jnp.int32)
  weights = jnp.asarray(rng.uniform(0.1, 1, (t, k)), jnp.float32)
  keep = jnp.asarray(rng.uniform(size=(t, k)) > 0.2)
  w = [jnp.asarray(rng.normal(size=s) / 3, jnp.float32) for s in ((2, d, f), (2, d, f),
                                                                   (2, f, d))]
  kwargs = {"slots": t} if path == "buffer" else {"grouped": path}

  def ours(x, *w):
    return moe.expert_ffn(x, experts, weights, keep, *w, first_expert=2, **kwargs)
  ref = np.zeros((t, d))
  for i in range(t):
    for j in range(k):
      e = int(experts[i, j]) - 2
      if keep[i, j] and e >= 0:
        ref[i] += float(weights[i, j]) * np_swiglu_ffn(np.asarray(x[i], np.float64),
                                                       *(np.asarray(a[e], np.float64) for a in w))
  np.testing.assert_allclose(jax.jit(ours)(x, *w), ref, rtol=1e-5, atol=1e-6)
  cot = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * cot), argnums=(0, 1, 2, 3)))(x, *w)

  def dense(x, wg, wu, wd):  # every local expert on every token, gated by its kept weight
    out = 0
    for e in range(2):
      gate = jnp.sum(jnp.where((experts == e + 2) & keep, weights, 0.0), axis=1)
      out = out + gate[:, None] * ((jax.nn.silu(x @ wg[e]) * (x @ wu[e])) @ wd[e])
    return jnp.sum(out * cot)
  for g, r in zip(grads, jax.jit(jax.grad(dense, argnums=(0, 1, 2, 3)))(x, *w)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
