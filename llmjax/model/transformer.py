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

from llmjax.model.attention import dot_product_attention
from llmjax.model.config import ModelConfig, RopeScaling


def project(x: jax.Array, w: jax.Array, spec: str, dtype) -> jax.Array:
  """`einsum(spec, x, w)` computed in `dtype`.

  Every weight matmul of the model goes through here, so that quantized weights and LoRA
  adapters have one place to take over the matmul.
  """
  return jnp.einsum(spec, x, w.astype(dtype))


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
    # Static (not a parameter): recomputed as a trace-time constant.
    self.rope = (h, cfg.rope_theta, cfg.rope_scaling)

  def __call__(self, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None) -> jax.Array:
    """`x [batch, seq, d_model]` -> `[batch, seq, d_model]`."""
    dt = self.dtype
    q = project(x, self.q_proj[...], "bsd,dnh->bsnh", dt)
    k = project(x, self.k_proj[...], "bsd,dnh->bsnh", dt)
    v = project(x, self.v_proj[...], "bsd,dnh->bsnh", dt)
    if self.qkv_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    inv_freq = rope_frequencies(*self.rope)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    out = dot_product_attention(q, k, v, segment_ids)
    return project(out, self.o_proj[...], "bsnh,nhd->bsd", dt)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pdt, std = jnp.dtype(cfg.param_dtype), cfg.init_std
    self.gate_proj = _param(rngs, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), std, pdt)
    self.up_proj = _param(rngs, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), std, pdt)
    self.down_proj = _param(rngs, (cfg.d_ff, cfg.d_model), ("mlp", "embed"), std, pdt)
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.dtype
    gate = jax.nn.silu(project(x, self.gate_proj[...], "bsd,df->bsf", dt))
    up = project(x, self.up_proj[...], "bsd,df->bsf", dt)
    return project(gate * up, self.down_proj[...], "bsf,fd->bsd", dt)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    self.input_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, positions, segment_ids):
    x = x + self.attn(self.input_norm(x), positions, segment_ids)
    return x + self.mlp(self.post_attn_norm(x))


class Transformer(nnx.Module):
  """Token ids `[batch, seq]` -> next-token logits `[batch, seq, vocab]` (float32)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    pdt = jnp.dtype(cfg.param_dtype)
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pdt)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                            cfg.init_std, pdt)

  def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    """Final-norm hidden states `[batch, seq, d_model]` in the compute dtype."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = self.embed[...].astype(self.config.dtype)[tokens]
    for layer in self.layers:
      x = layer(x, positions, segment_ids)
    return self.final_norm(x)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """`[batch, seq, d_model]` -> float32 `[batch, seq, vocab]`."""
    dt = self.config.dtype
    w = self.embed[...].T if self.config.tie_embeddings else self.lm_head[...]
    return jnp.einsum("bsd,dv->bsv", hidden, w.astype(dt), preferred_element_type=jnp.float32)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """`tokens [batch, seq]`, optional `positions`/`segment_ids [batch, seq]` of packed rows."""
    return self.logits(self.hidden_states(tokens, positions, segment_ids))


def build_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """A freshly initialized model (random weights: it speaks gibberish)."""
  return Transformer(cfg, rngs=nnx.Rngs(params=seed))


def logical_axes(state: nnx.State):
  """The `logical_axes` tuple of every parameter, as a pytree shaped like `state`."""
  return jax.tree.map(lambda v: v.get_metadata().get("logical_axes"), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
