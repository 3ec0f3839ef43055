"""The mixture-of-experts MLP of Mixtral and Qwen2-MoE: a router, n SwiGLU experts, top-k.

Each token's router logits `x @ router` give a float32 softmax over the experts; the token
goes to its k most probable experts, weighted by their probabilities (renormalised to sum to
1 with `norm_topk_prob`, as Mixtral does and Qwen1.5-MoE does not), exactly as transformers'
MixtralSparseMoeBlock and Qwen2MoeSparseMoeBlock compute it. Qwen2-MoE adds a dense shared
expert that every token passes through, scaled by `sigmoid(x @ shared_gate)`.

Parameters (the layout checkpoints and HF conversion rely on), for E experts of width f:
  router     [d_model, E]     ("embed", None)
  gate_proj  [E, d_model, f]  ("expert", "embed", "mlp")
  up_proj    [E, d_model, f]  ("expert", "embed", "mlp")
  down_proj  [E, f, d_model]  ("expert", "mlp", "embed")
  shared     an `MLP` of width d_ff_shared (gate_proj, up_proj, down_proj), if d_ff_shared
  shared_gate [d_model, 1]    ("embed", None), if shared_expert_gate

Two ways to run the experts, both static-shaped:
  dropless (moe_capacity_factor 0): the token-expert assignments are sorted by expert and
    run as grouped matmuls (`jax.lax.ragged_dot`, a native grouped GEMM on GPU and TPU), then
    unsorted and summed with their weights. Nothing is ever dropped. XLA:CPU has no grouped
    GEMM (it lowers ragged_dot to a masked dense matmul per expert over all rows), so on CPU
    the sorted rows run in expert-aligned blocks instead (`_blocked_ffn`).
  capacity (moe_capacity_factor c > 0): expert e takes at most C = ceil(c * T * k / E)
    assignments of the T tokens of the forward pass, in a `[E, C, d_model]` buffer run as one
    batched matmul. Priority (GShard's): every token's first choice before any second choice,
    and within one choice rank earlier tokens (row-major over the batch) first, so the tokens
    that overflow are the latest ones. A dropped assignment adds nothing (the token keeps its
    other experts, the shared expert and the residual stream); padding (segment id 0) is never
    dispatched and takes no slot. Generation (`decode`) always runs dropless.

Expert parallelism (a mesh whose `expert` axis has X > 1 devices): the experts are split over
`expert`, E/X per device, and the batch rows over data x fsdp x expert as everywhere else.
Inside `jax.shard_map` each device all-gathers the rows of its expert group (the X devices
that share its data and fsdp coordinates), runs its own experts on the assignments that chose
them, and the partial outputs go back to the rows' owners by a reduce-scatter over `expert`
(a psum over `tensor` first when the experts' hidden units are split there). The weights
enter the shard_map gathered over `fsdp` (as FSDP gathers any weight for its matmul), so the
experts' `embed` dimension may stay sharded at rest. The routing itself (router, top-k,
capacity, statistics) runs on the global batch outside the shard_map, so the result does
not depend on the mesh. Trade-off: each device receives its group's X x T rows where an
all-to-all dispatch would move about k x T, and its static buffers are sized for the
group's X x T x k assignments, about X times those its experts get (what ragged_dot spends
on the empty rows depends on its backend); simple and exact, meant for small X. A ragged all-to-all
dispatch is the step up for large expert counts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from llmjax.errors import ConfigError
from llmjax.model import router_losses
from llmjax.model.config import ModelConfig
from llmjax.model.matmul import weight_matmul
from llmjax.model.transformer import MLP, _param, swiglu
from llmjax.parallel.mesh import active_mesh, logical_to_spec

EXPERT_AXES = ("expert", "embed", "mlp")
DOWN_AXES = ("expert", "mlp", "embed")


def route(logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
  """(weights `[..., k]` float32, experts `[..., k]` int32) from router logits `[..., E]`:
  the top-k of the float32 softmax, renormalised to sum to 1 if `normalize`."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, k)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts.astype(jnp.int32)


def capacity(tokens: int, k: int, n_experts: int, factor: float) -> int:
  """Slots per expert: ceil(factor * tokens * k / n_experts)."""
  return max(1, math.ceil(factor * tokens * k / n_experts))


def capacity_keep(experts: jax.Array, valid: jax.Array, n_experts: int,
                  slots: int) -> jax.Array:
  """Which assignments fit their expert's `slots`, in GShard's priority order.

  Args:
    experts: `[tokens, k]` chosen experts, tokens in priority order.
    valid: `[tokens]` bool; invalid tokens (padding) take no slot and are not kept.
  Returns:
    `[tokens, k]` bool.
  """
  t, k = experts.shape
  by_choice = jax.nn.one_hot(experts.T, n_experts, dtype=jnp.int32) * valid[None, :, None]
  # Running count per expert over (choice rank, token): a first choice of any token comes
  # before every second choice.
  seen = jnp.cumsum(by_choice.reshape(k * t, n_experts), axis=0).reshape(k, t, n_experts)
  position = jnp.sum(seen * by_choice, axis=-1) - 1  # [k, t]; -1 where invalid
  return ((position < slots) & valid[None, :]).T


# Rows per block of the CPU dropless path (`_blocked_ffn`).
CPU_BLOCK_ROWS = 64


def expert_ffn(x: jax.Array, experts: jax.Array, weights: jax.Array, keep: jax.Array,
               w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, first_expert=0,
               slots: int | None = None, dtype=jnp.float32,
               grouped: str | None = None) -> jax.Array:
  """The weighted sum of a block of experts' outputs over each token's kept assignments.

  Args:
    x: `[tokens, d_model]`.
    experts, weights, keep: `[tokens, k]` chosen expert ids (global), router weights, and
      whether each assignment runs (False: dropped by capacity).
    w_gate, w_up: `[E_local, d_model, f]`, w_down `[E_local, f, d_model]`: experts
      `first_expert .. first_expert + E_local - 1`; assignments to others add nothing.
    slots: None: dropless. An int: at most this many kept assignments per expert, run in an
      `[E_local, slots, d_model]` buffer (the caller guarantees the bound).
    grouped: how dropless runs its grouped matmuls: 'ragged' (`jax.lax.ragged_dot`; the
      default on GPU and TPU, where it is a native grouped GEMM) or 'blocks' (the default on
      CPU, where ragged_dot lowers to a masked dense matmul per expert over all rows: E
      times the work). See `_blocked_ffn`.
  Returns:
    `[tokens, d_model]` float32.
  """
  t, k = experts.shape
  n_local = w_gate.shape[0]
  local = experts - first_expert
  mine = (keep & (local >= 0) & (local < n_local)).reshape(-1)
  group = jnp.where(mine, local.reshape(-1), n_local)  # [t * k]; others sort last
  order = jnp.argsort(group, stable=True)  # the assignments grouped by expert
  sizes = jnp.bincount(group, length=n_local + 1)
  # Each assignment's rank among its expert's, in sorted order.
  rank_sorted = jnp.arange(t * k) - (jnp.cumsum(sizes) - sizes)[group[order]]
  tokens = order // k  # the token of each sorted assignment
  cast = lambda w: w.astype(dtype)
  grouped = grouped or ("blocks" if jax.default_backend() == "cpu" else "ragged")
  if slots is None and grouped == "ragged":
    rows = x[tokens].astype(dtype)
    mm = lambda a, w: jax.lax.ragged_dot(a, cast(w), sizes[:n_local],
                                         preferred_element_type=jnp.float32)
    hidden = swiglu(mm(rows, w_gate).astype(dtype), mm(rows, w_up).astype(dtype))
    out_sorted = mm(hidden, w_down)  # [t * k, d]; rows past the groups are not computed
  elif slots is None:
    out_sorted = _blocked_ffn(x[tokens].astype(dtype), group[order], rank_sorted, sizes,
                              w_gate, w_up, w_down, dtype)
  else:
    # A unique slot per kept assignment: its rank among its expert's.
    target = (group[order], rank_sorted)
    buffer = jnp.zeros((n_local, slots, x.shape[-1]), dtype).at[target].set(
        x[tokens].astype(dtype), mode="drop")  # others' rows (group n_local) fall off
    mm = lambda a, w, spec: jnp.einsum(spec, a, cast(w), preferred_element_type=jnp.float32)
    hidden = swiglu(mm(buffer, w_gate, "ecd,edf->ecf").astype(dtype),
                    mm(buffer, w_up, "ecd,edf->ecf").astype(dtype))
    out_buffer = mm(hidden, w_down, "ecf,efd->ecd")
    out_sorted = out_buffer[jnp.minimum(target[0], n_local - 1), jnp.minimum(target[1],
                                                                              slots - 1)]
  out = jnp.zeros_like(out_sorted).at[order].set(out_sorted)  # back to (token, choice) order
  out = jnp.where(mine[:, None], out, 0.0).reshape(t, k, -1)  # never garbage * 0
  return jnp.einsum("tk,tkd->td", weights.astype(jnp.float32), out)


def _blocked_ffn(rows, group, rank, sizes, w_gate, w_up, w_down, dtype):
  """The experts on their sorted rows, `CPU_BLOCK_ROWS` rows at a time (MegaBlocks' layout).

  Each expert's rows are padded to whole blocks, so every block belongs to one expert; a
  `lax.scan` over the blocks runs one `[block, d] @ [d, f]` SwiGLU per block with that
  expert's weights. Work: `rows + E_local * (block - 1)` rows (the static bound), against
  `E_local * rows` for XLA:CPU's ragged_dot. (Under expert parallelism most rows are other
  devices' and still cost their blocks: on CPU that is a test setting, not a fast path.)

  Args:
    rows: `[n, d]` the assignments' inputs sorted by expert; `group [n]` their local expert
      (E_local: not this device's, sorted last); `rank [n]` their index within it;
      `sizes [E_local + 1]` the rows per group.
  Returns:
    `[n, d]` float32, 0 for rows of no local expert.
  """
  n, d = rows.shape
  n_local, block = w_gate.shape[0], CPU_BLOCK_ROWS
  padded = -(-sizes[:n_local] // block) * block
  ends = jnp.cumsum(padded)
  n_blocks = -(-(n + n_local * (block - 1)) // block)  # a static bound on sum(padded)
  mine = group < n_local
  slot = jnp.where(mine, (ends - padded)[jnp.minimum(group, n_local - 1)] + rank,
                   n_blocks * block)
  xs = jnp.zeros((n_blocks * block, d), dtype).at[slot].set(rows, mode="drop")
  block_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(n_blocks) * block,
                                              side="right"), n_local - 1)

  def one_block(_, xs_e):
    xb, e = xs_e  # blocks past the last expert's hold zero rows, run with its weights
    mm = lambda a, w: jnp.dot(a, w[e].astype(dtype), preferred_element_type=jnp.float32)
    hidden = swiglu(mm(xb, w_gate).astype(dtype), mm(xb, w_up).astype(dtype))
    return None, mm(hidden, w_down)
  _, ys = jax.lax.scan(one_block, None, (xs.reshape(n_blocks, block, d), block_expert))
  return jnp.where(mine[:, None], ys.reshape(-1, d)[jnp.minimum(slot, n_blocks * block - 1)],
                   0.0)


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _expert_parallel(x, experts, weights, keep, w_gate, w_up, w_down, slots, dtype, mesh,
                     rules):
  """`expert_ffn` over a mesh: `x [batch, seq, d]`, the routing `[batch, seq, k]`; see the
  module docstring. Returns `[batch, seq, d]` in `dtype`, split like `x`."""
  rows = logical_to_spec(("batch", None, None), x.shape, mesh, rules)
  routing = P(rows[0], None, None)
  up_spec = logical_to_spec(("expert", None, "mlp"), w_gate.shape, mesh, rules)
  down_spec = logical_to_spec(("expert", "mlp", None), w_down.shape, mesh, rules)
  expert_axes, hidden_axes = _axes(up_spec[0]), _axes(up_spec[2])
  gathered = tuple(a for a in _axes(rows[0]) if a in expert_axes)
  replicated = tuple(a for a in expert_axes if a not in gathered)
  n_local = w_gate.shape[0] // math.prod(mesh.shape[a] for a in expert_axes)

  def per_device(x, experts, weights, keep, w_gate, w_up, w_down):
    if gathered:  # the rows of this device's expert group
      x, experts, weights, keep = (jax.lax.all_gather(a, gathered, axis=0, tiled=True)
                                   for a in (x, experts, weights, keep))
    index = 0
    for a in expert_axes:
      index = index * mesh.shape[a] + jax.lax.axis_index(a)
    b, s, d = x.shape
    flat = lambda a: a.reshape(b * s, -1)
    out = expert_ffn(flat(x), flat(experts), flat(weights), flat(keep), w_gate, w_up, w_down,
                     index * n_local, None if slots is None else min(slots, b * s), dtype)
    out = out.reshape(b, s, d)
    if hidden_axes:  # each device holds a slice of every expert's hidden units
      out = jax.lax.psum(out, hidden_axes)
    if replicated:  # every device of the group has all the rows: add the groups' parts
      out = jax.lax.psum(out, replicated)
    if gathered:
      out = jax.lax.psum_scatter(out, gathered, scatter_dimension=0, tiled=True)
    return out.astype(dtype)

  return jax.shard_map(per_device, mesh=mesh,
                       in_specs=(rows, routing, routing, routing, up_spec, up_spec, down_spec),
                       out_specs=rows)(x, experts, weights, keep, w_gate, w_up, w_down)


def check_parallelism(cfg: ModelConfig, expert: int, stage: int = 1) -> None:
  """ConfigError unless an MoE model of `cfg` runs on a mesh with these `expert` and `stage`
  axis sizes: the expert axis must divide the experts, and MoE is not pipelined (the
  pipeline's bubble ticks would add garbage to the router statistics)."""
  if not cfg.n_experts:
    return
  if cfg.n_experts % expert:
    raise ConfigError(f"ModelConfig.n_experts={cfg.n_experts} does not split over "
                      f"MeshConfig.expert={expert} devices: make MeshConfig.expert a divisor "
                      "of the expert count")
  if stage > 1:
    raise ConfigError(f"a mixture-of-experts model (ModelConfig.n_experts={cfg.n_experts}) "
                      f"cannot be pipelined (MeshConfig.stage={stage}): use MeshConfig.stage=1 "
                      "and split the experts over MeshConfig.expert instead")


class MoE(nnx.Module):
  """A block's MLP as a mixture of experts (the module docstring); `x [batch, seq, d_model]`
  -> (`[batch, seq, d_model]`, this layer's `router_losses.RouterStats`)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, n, f = cfg.d_model, cfg.n_experts, cfg.resolved_d_ff_expert
    pdt, std = jnp.dtype(cfg.param_dtype), cfg.init_std
    self.router = _param(rngs, (d, n), ("embed", None), std, pdt)
    self.gate_proj = _param(rngs, (n, d, f), EXPERT_AXES, std, pdt)
    self.up_proj = _param(rngs, (n, d, f), EXPERT_AXES, std, pdt)
    self.down_proj = _param(rngs, (n, f, d), DOWN_AXES, std, pdt)
    if cfg.d_ff_shared:
      self.shared = MLP(cfg, cfg.d_ff_shared, rngs=rngs)
      if cfg.shared_expert_gate:
        self.shared_gate = _param(rngs, (d, 1), ("embed", None), std, pdt)
    self.top_k = cfg.n_experts_per_token
    self.normalize = cfg.norm_topk_prob
    self.capacity_factor = cfg.moe_capacity_factor
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None,
               dropless: bool = False) -> tuple[jax.Array, router_losses.RouterStats]:
    """`segment_ids [batch, seq]` mark padding (0); `dropless` ignores the capacity factor."""
    b, s, d = x.shape
    dt = self.dtype
    n_experts = self.router.shape[-1]
    valid = (jnp.ones((b, s), bool) if segment_ids is None else segment_ids != 0)
    logits = weight_matmul(x.astype(dt), self.router[...].astype(dt), "bsd,de->bse",
                           jnp.float32)
    weights, experts = route(logits, self.top_k, self.normalize)
    slots, dropped = None, None
    keep = jnp.ones(experts.shape, bool)
    if self.capacity_factor and not dropless:
      slots = capacity(b * s, self.top_k, n_experts, self.capacity_factor)
      keep = capacity_keep(experts.reshape(b * s, -1), valid.reshape(-1), n_experts,
                           slots).reshape(experts.shape)
      dropped = jnp.sum(valid[..., None] & ~keep)
    w = (self.gate_proj[...], self.up_proj[...], self.down_proj[...])
    active = active_mesh()
    if active is None:
      flat = lambda a: a.reshape(b * s, -1)
      out = expert_ffn(flat(x), flat(experts), flat(weights), flat(keep), *w, 0,
                       None if slots is None else min(slots, b * s), dt)
      out = out.reshape(b, s, d).astype(dt)
    else:
      if n_experts % dict(active[0].shape).get("expert", 1):
        raise ConfigError(f"{n_experts} experts do not split over the mesh's expert axis "
                          f"{dict(active[0].shape)}: see moe.check_parallelism")
      out = _expert_parallel(x, experts, weights, keep, *w, slots, dt, *active)
    if hasattr(self, "shared"):
      shared = self.shared(x)
      if hasattr(self, "shared_gate"):
        gate = weight_matmul(x.astype(dt), self.shared_gate[...].astype(dt), "bsd,do->bso",
                             jnp.float32)
        shared = (jax.nn.sigmoid(gate) * shared.astype(jnp.float32)).astype(dt)
      out = out + shared
    stats = router_losses.router_stats(logits.reshape(b * s, -1), experts.reshape(b * s, -1),
                                       valid.reshape(-1), dropped)
    return out, stats
