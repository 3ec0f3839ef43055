"""The decoder-only transformer of the Llama-2/3 and Qwen2 families, in flax.nnx.

Every parameter carries `logical_axes` metadata (`embed`, `vocab`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `norm`), so `llmjax.parallel` can map it to a device mesh with one table of
rules and the model never mentions devices.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.errors import ConfigError
from llmjax.model import lora, quant, router_losses
from llmjax.model.attention import attend, cache_attention_mask, cached_attention, write_cache
from llmjax.model.matmul import CHECKPOINT_NAME, weight_matmul
from llmjax.model.config import ModelConfig, RopeScaling
from llmjax.parallel import pipeline as pipeline_lib
from llmjax.parallel.mesh import active_mesh, active_pipeline, constrain
from llmjax.parallel.pipeline import PipelineConfig

# The residual stream between blocks: rows split over the batch mesh axes, nothing else
# (a no-op unless a training step runs under `llmjax.parallel.mesh.activation_sharding`).
RESIDUAL_AXES = ("batch", None, None)


def project(x: jax.Array, w: jax.Array, spec: str, dtype) -> jax.Array:
  """`einsum(spec, x, w)` computed in `dtype`.

  Every weight matmul of the model goes through here, so that quantized weights and LoRA
  adapters have one place to take over the matmul. A `quant.QuantizedTensor` weight (read
  from a `quant.QuantizedWeight`) runs as one 2-D quantized matmul instead; a
  `lora.LoraTensor` (read through `lora.weight`) adds its low-rank term.
  """
  if isinstance(w, lora.LoraTensor):
    return lora.lora_project(x, w, spec, dtype, base_project=project)
  if isinstance(w, quant.QuantizedTensor):
    return quant.quantized_project(x, w, spec, dtype)
  return weight_matmul(x.astype(dtype), w.astype(dtype), spec)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float,
           dtype) -> nnx.Param:
  value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
  """x / rms(x) * weight, computed in float32 as Llama and Qwen2 do."""

  def __init__(self, dim: int, eps: float, param_dtype):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.weight[...].astype(jnp.float32) * x32).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float,
                     scaling: RopeScaling | None = None) -> np.ndarray:
  """Inverse frequencies `[head_dim // 2]`, with Llama-3 wavelength-dependent scaling.

  Computed in float32 exactly as Hugging Face does, so imported checkpoints match.
  """
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
  if scaling is None:
    return inv_freq
  # Long wavelengths (low frequencies) are stretched by `factor`, short ones kept, and the
  # band in between interpolated smoothly (Llama 3.1 paper, section 3.x; HF rope_type=llama3).
  low_wavelen = scaling.original_max_position / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = ((scaling.original_max_position / wavelen - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates `x [batch, seq, heads, head_dim]` by `positions [batch, seq]`.

  Uses the half-split ("rotate_half") layout of Hugging Face Llama, so weights need no
  permutation on import or export.
  """
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, s, h/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query attention with rotary embeddings and optional QKV bias (Qwen2)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, n, kv, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    pdt, std = jnp.dtype(cfg.param_dtype), cfg.init_std
    self.q_proj = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std, pdt)
    self.k_proj = _param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), std, pdt)
    self.v_proj = _param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), std, pdt)
    self.o_proj = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), std, pdt)
    if cfg.qkv_bias:
      self.q_bias = nnx.Param(jnp.zeros((n, h), pdt), logical_axes=("heads", "head_dim"))
      self.k_bias = nnx.Param(jnp.zeros((kv, h), pdt), logical_axes=("kv_heads", "head_dim"))
      self.v_bias = nnx.Param(jnp.zeros((kv, h), pdt), logical_axes=("kv_heads", "head_dim"))
    self.qkv_bias = cfg.qkv_bias
    self.dtype = jnp.dtype(cfg.dtype)
    self.backend = cfg.attention
    # Static (not a parameter): recomputed as a trace-time constant.
    self.rope = (h, cfg.rope_theta, cfg.rope_scaling)

  def __call__(self, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None) -> jax.Array:
    """`x [batch, seq, d_model]` -> `[batch, seq, d_model]`."""
    q, k, v = self._qkv(x, positions)
    out = attend(q, k, v, segment_ids, self.backend)
    return project(out, lora.weight(self, "o_proj"), "bsnh,nhd->bsd", self.dtype)

  def decode(self, x: jax.Array, positions: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
             index: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention of new tokens over a KV cache, writing their keys and values into it.

    Args:
      x: `[batch, seq, d_model]` the new tokens; `positions [batch, seq]` their RoPE positions.
      k_cache, v_cache: `[batch, cache_len, n_kv_heads, head_dim]`.
      index: `[batch]` the cache slot of each row's first new token (rows may differ).
      mask: `[batch, 1, 1, seq, cache_len]` from `cache_attention_mask`.
    Returns:
      (`[batch, seq, d_model]`, updated k_cache, updated v_cache).
    """
    q, k, v = self._qkv(x, positions)
    k_cache = write_cache(k_cache, k, index)
    v_cache = write_cache(v_cache, v, index)
    out = cached_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask)
    out = project(out, lora.weight(self, "o_proj"), "bsnh,nhd->bsd", self.dtype)
    return out, k_cache, v_cache

  def _qkv(self, x: jax.Array, positions: jax.Array):
    dt = self.dtype
    q = project(x, lora.weight(self, "q_proj"), "bsd,dnh->bsnh", dt)
    k = project(x, lora.weight(self, "k_proj"), "bsd,dnh->bsnh", dt)
    v = project(x, lora.weight(self, "v_proj"), "bsd,dnh->bsnh", dt)
    if self.qkv_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    inv_freq = rope_frequencies(*self.rope)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    return q, k, v


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """`silu(gate) * up`."""
  return jax.nn.silu(gate) * up


def _swiglu_forward(gate, up):
  return swiglu(gate, up), (gate, up)


def _swiglu_backward(residuals, d_out):
  gate, up = residuals
  sig = jax.nn.sigmoid(gate)
  d_gate = d_out * up * sig * (1 + gate * (1 - sig))
  return d_gate.astype(gate.dtype), (d_out * gate * sig).astype(up.dtype)


swiglu.defvjp(_swiglu_forward, _swiglu_backward)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), of width `d_ff` (default: the config's)."""

  def __init__(self, cfg: ModelConfig, d_ff: int | None = None, *, rngs: nnx.Rngs):
    pdt, std = jnp.dtype(cfg.param_dtype), cfg.init_std
    d_ff = d_ff or cfg.d_ff
    self.gate_proj = _param(rngs, (cfg.d_model, d_ff), ("embed", "mlp"), std, pdt)
    self.up_proj = _param(rngs, (cfg.d_model, d_ff), ("embed", "mlp"), std, pdt)
    self.down_proj = _param(rngs, (d_ff, cfg.d_model), ("mlp", "embed"), std, pdt)
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.dtype
    gate = project(x, lora.weight(self, "gate_proj"), "bsd,df->bsf", dt)
    up = project(x, lora.weight(self, "up_proj"), "bsd,df->bsf", dt)
    return project(swiglu(gate, up), lora.weight(self, "down_proj"), "bsf,fd->bsd", dt)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)); the MLP is a mixture
  of experts (`llmjax.model.moe.MoE`) when `n_experts > 0`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    self.input_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
    if cfg.n_experts:
      from llmjax.model.moe import MoE  # moe.py builds on this module's MLP
      self.mlp = MoE(cfg, rngs=rngs)
    else:
      self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, positions, segment_ids
               ) -> tuple[jax.Array, router_losses.RouterStats | None]:
    """(`[batch, seq, d_model]`, the MoE router's statistics, or None for a dense MLP)."""
    x = x + self.attn(self.input_norm(x), positions, segment_ids)
    if isinstance(self.mlp, MLP):
      return x + self.mlp(self.post_attn_norm(x)), None
    out, stats = self.mlp(self.post_attn_norm(x), segment_ids)
    return x + out, stats

  def decode(self, x, positions, k_cache, v_cache, index, mask):
    """`Block.__call__` over a KV cache (see `Attention.decode`); experts run dropless."""
    attn, k_cache, v_cache = self.attn.decode(self.input_norm(x), positions, k_cache, v_cache,
                                              index, mask)
    x = x + attn
    h = self.post_attn_norm(x)
    out = self.mlp(h) if isinstance(self.mlp, MLP) else self.mlp(h, dropless=True)[0]
    return x + out, k_cache, v_cache


# What a rematerialized block keeps from its forward pass; the rest is recomputed.
_save_weight_matmuls = jax.checkpoint_policies.save_only_these_names(CHECKPOINT_NAME)
REMAT_POLICIES = {
    "full": None,  # nothing: least memory, one extra forward per block
    # every matmul output (attention's too)
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots, _save_weight_matmuls),
    "dots_no_batch": _save_weight_matmuls,  # the weights' matmuls only
}


def _stack_blocks(layers) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef of one block, every block's state stacked to `[n_layers, ...]`).

  Parameters stay stored per layer (the layout checkpoints and HF conversion use) and are
  stacked inside the step; under jit that is a cheap copy next to the block compute.
  """
  graphdef, _ = nnx.split(layers[0])
  return graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.split(l)[1] for l in layers])


def _scan_blocks(layers, run_block, x: jax.Array, positions, segment_ids):
  """Runs identical blocks under `lax.scan`, so XLA compiles one block instead of n.

  Returns (x, the router statistics summed over the layers, or None): they leave the scan
  as its per-layer outputs, the only way a value gets out of a scan body.
  """
  graphdef, stacked = _stack_blocks(layers)

  def body(x, layer):
    index, state = layer
    with lora.fold_dropout_key(index):  # LoRA dropout masks differ between layers
      return run_block(nnx.merge(graphdef, state), x, positions, segment_ids)
  x, stats = jax.lax.scan(body, x, (jnp.arange(len(layers)), stacked))
  return x, jax.tree.map(lambda a: jnp.sum(a, axis=0), stats)


def _pipeline_blocks(layers, run_block, x: jax.Array, positions, segment_ids,
                     pipeline: PipelineConfig) -> jax.Array:
  """The blocks pipelined over the mesh's `stage` axis (`llmjax.parallel.pipeline`)."""
  graphdef, stacked = _stack_blocks(layers)

  def apply_layer(state, index, microbatch, x, positions, segment_ids):
    # LoRA dropout masks differ between layers and between pipeline microbatches.
    with lora.fold_dropout_key(microbatch), lora.fold_dropout_key(index):
      return run_block(nnx.merge(graphdef, state), x, positions, segment_ids)[0]
  mesh, rules = active_mesh()
  return pipeline_lib.run(stacked, apply_layer, x, positions, segment_ids, pipeline, mesh,
                          rules)


class Transformer(nnx.Module):
  """Token ids `[batch, seq]` -> next-token logits `[batch, seq, vocab]` (float32), or with
  `head='score'` (a reward model) one float32 score per position `[batch, seq]`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    pdt = jnp.dtype(cfg.param_dtype)
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pdt)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
    if cfg.head == "score":
      # HF's score nn.Linear(d_model, 1), initialised normal(0, initializer_range) like it.
      self.score = _param(rngs, (cfg.d_model, 1), ("embed", None), cfg.init_std, pdt)
    elif not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                            cfg.init_std, pdt)

  def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    """Final-norm hidden states `[batch, seq, d_model]` in the compute dtype.

    An MoE model also `router_losses.record`s its router statistics (summed over the
    layers), which the train loop turns into the router losses.
    """
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    cfg = self.config
    x = constrain(self.embed[...].astype(cfg.dtype)[tokens], RESIDUAL_AXES)

    def run_block(layer: Block, x: jax.Array, positions, segment_ids):
      x, stats = layer(x, positions, segment_ids)
      return constrain(x, RESIDUAL_AXES), stats
    pipeline = active_pipeline()
    stats = None
    if pipeline is not None or cfg.scan_layers:
      if cfg.remat != "none":
        run_block = nnx.remat(run_block, policy=REMAT_POLICIES[cfg.remat])
      if pipeline is not None:  # under a training step on a mesh with stage > 1
        if cfg.n_experts:  # refused (the train loop refuses it before compiling)
          from llmjax.model import moe
          moe.check_parallelism(cfg, 1, pipeline.stages)
        x = _pipeline_blocks(self.layers, run_block, x, positions, segment_ids, pipeline)
      else:
        x, stats = _scan_blocks(self.layers, run_block, x, positions, segment_ids)
    else:
      for layer in self.layers:
        if cfg.remat == "none":
          x, layer_stats = run_block(layer, x, positions, segment_ids)
        else:
          # Rematerialized through the block's state, not the module: when the block's
          # variables come from different traces (adapters under grad, the frozen base
          # outside it: a LoRA step), nnx.remat on the module fails with "Cannot mutate
          # Param from a different trace level".
          graphdef, state = nnx.split(layer)
          x, layer_stats = jax.checkpoint(
              lambda s, x, g=graphdef: run_block(nnx.merge(g, s), x, positions, segment_ids),
              policy=REMAT_POLICIES[cfg.remat])(state, x)
        stats = router_losses.add_stats(stats, layer_stats)
    if stats is not None:
      router_losses.record(stats, cfg.router_aux_loss_coef, cfg.router_z_loss_coef,
                           cfg.n_experts_per_token)
    return self.final_norm(x)

  def decode(self, tokens: jax.Array, positions: jax.Array, token_valid: jax.Array, cache):
    """Runs new tokens against a KV cache: prefill (many tokens) and decode (one) alike.

    Args:
      tokens: `[batch, seq]` new tokens, written at cache slots `cache.index + arange(seq)`.
      positions: `[batch, seq]` their RoPE positions (per row, so padded prompts line up).
      token_valid: `[batch, seq]` bool, False for padding (never attended to).
      cache: a `llmjax.sample.kv_cache.KVCache` (k, v: per-layer
        `[batch, cache_len, n_kv_heads, head_dim]`; valid `[batch, cache_len]`; index `[batch]`).
    Returns:
      (final-norm hidden states `[batch, seq, d_model]`, the updated cache).
    """
    seq = tokens.shape[1]
    slots = cache.index[:, None] + jnp.arange(seq)
    valid = write_cache(cache.valid, token_valid, cache.index)
    mask = cache_attention_mask(valid, slots)
    # Under `activation_sharding` (RL rollouts in a training run), rows split over the batch
    # axes as in training; elsewhere the constraints are no-ops.
    x = constrain(self.embed[...].astype(self.config.dtype)[tokens], RESIDUAL_AXES)
    ks, vs = [], []
    for layer, k_cache, v_cache in zip(self.layers, cache.k, cache.v):
      x, k_cache, v_cache = layer.decode(x, positions, k_cache, v_cache, cache.index, mask)
      x = constrain(x, RESIDUAL_AXES)
      ks.append(k_cache)
      vs.append(v_cache)
    new_cache = cache._replace(k=tuple(ks), v=tuple(vs), valid=valid, index=cache.index + seq)
    return self.final_norm(x), new_cache

  def logits(self, hidden: jax.Array) -> jax.Array:
    """`[batch, seq, d_model]` -> float32 `[batch, seq, vocab]`."""
    if self.config.head != "lm":
      raise ConfigError(f"logits(): this model has head {self.config.head!r} (a reward model), "
                        "which has no lm_head: it gives one score per position; call "
                        "scores(hidden) or the model itself")
    dt = self.config.dtype
    w = self.embed[...].T if self.config.tie_embeddings else lora.weight(self, "lm_head")
    if isinstance(w, lora.LoraTensor):
      return lora.lora_project(hidden, w, "bsd,dv->bsv", dt, jnp.float32,
                               base_project=self._head_matmul)
    return self._head_matmul(hidden, w, "bsd,dv->bsv", dt)

  def scores(self, hidden: jax.Array) -> jax.Array:
    """`[batch, seq, d_model]` -> float32 `[batch, seq]`: the score head at every position.

    Like `logits`, the matmul reads the compute dtype and accumulates into float32.
    """
    if self.config.head != "score":
      raise ConfigError(f"scores(): this model has head {self.config.head!r}, not 'score': "
                        "it has no score projection (make a reward model with "
                        "llmjax.model.reward.init_reward_model)")
    dt = self.config.dtype
    return self._head_matmul(hidden, self.score[...], "bsd,do->bso", dt)[..., 0]

  @staticmethod
  def _head_matmul(hidden, w, spec, dt):
    return weight_matmul(hidden.astype(dt), w.astype(dt), spec, jnp.float32)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """`tokens [batch, seq]`, optional `positions`/`segment_ids [batch, seq]` of packed rows.

    Returns logits `[batch, seq, vocab]`, or scores `[batch, seq]` for head 'score'.
    """
    hidden = self.hidden_states(tokens, positions, segment_ids)
    return self.scores(hidden) if self.config.head == "score" else self.logits(hidden)


def build_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """A freshly initialized model (random weights: it speaks gibberish)."""
  return Transformer(cfg, rngs=nnx.Rngs(params=seed))


def logical_axes(state: nnx.State):
  """The `logical_axes` tuple of every parameter, as a pytree shaped like `state`."""
  return jax.tree.map(lambda v: v.get_metadata().get("logical_axes"), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
