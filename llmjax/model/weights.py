"""The projection weights of the transformer: where they live and how their axes read.

One table that quantization, LoRA and the mesh rules share, taken from the einsum specs in
transformer.py (`"bsd,dnh->bsnh"` contracts one input axis of q_proj, `"bsnh,nhd->bsd"` two
of o_proj).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from flax import nnx

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Layout:
  """`n_in` leading axes are contracted (d_in); `in_axes`/`out_axes` are their logical names."""
  n_in: int
  in_axes: tuple[str, ...]
  out_axes: tuple[str, ...]


LAYOUTS = {
    "q_proj": Layout(1, ("embed",), ("heads", "head_dim")),
    "k_proj": Layout(1, ("embed",), ("kv_heads", "head_dim")),
    "v_proj": Layout(1, ("embed",), ("kv_heads", "head_dim")),
    "o_proj": Layout(2, ("heads", "head_dim"), ("embed",)),
    "gate_proj": Layout(1, ("embed",), ("mlp",)),
    "up_proj": Layout(1, ("embed",), ("mlp",)),
    "down_proj": Layout(1, ("mlp",), ("embed",)),
    "lm_head": Layout(1, ("embed",), ("vocab",)),
}


def projection_weights(model: nnx.Module, names: tuple[str, ...] | list[str]
                       ) -> Iterator[tuple[nnx.Module, str, str]]:
  """(owner module, attribute, dotted name) of each block weight in `names`, layer by layer,
  then `lm_head` if named (whether or not the model ties it to the embedding).

  A mixture of experts has no MLP projections: its expert weights are `[n_experts, ...]`
  stacks (llmjax/model/moe.py), which LoRA and quantization refuse rather than treat as one
  matrix.
  """
  dense_mlp = not model.config.n_experts
  for i, layer in enumerate(model.layers):
    for attr in ATTENTION:
      if attr in names:
        yield layer.attn, attr, f"layers.{i}.attn.{attr}"
    for attr in MLP:
      if attr in names and dense_mlp:
        yield layer.mlp, attr, f"layers.{i}.mlp.{attr}"
  if "lm_head" in names:
    yield model, "lm_head", "lm_head"
