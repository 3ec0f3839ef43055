"""Pure mapping between llmjax parameters/configs and Hugging Face Llama/Qwen2 checkpoints,
and the mixtures of experts Mixtral and Qwen2-MoE.

Nothing here touches files or imports transformers. Export is an iterator of
`(hf_name, numpy array)` pairs that a writer consumes one at a time, so a model is never held
twice in host memory, and anything that can produce our parameter layout (e.g. LoRA weights
merged on the fly) exports through the same code by passing its own `fetch`.

Our layout keeps heads as separate axes (`q_proj [d_model, n_heads, head_dim]`) and stores
linear weights `[in, out]`; HF stores `nn.Linear` weights `[out, in]` with heads flattened.
RoPE uses HF's rotate_half convention in both, so no permutation of q/k rows is needed.

Experts: we stack them (`gate_proj [E, d_model, f]`); checkpoints hold one Linear per expert
(Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2`, Qwen2-MoE `mlp.experts.{e}.gate_proj/...`),
so each of our expert parameters is E TensorSpecs, one per slice. transformers 5 computes with
fused `experts.gate_up_proj [E, 2f, d]` modules, but its save_pretrained converts back to this
per-expert layout, which every other tool reads too: only that layout is written and read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import numpy as np

from llmjax.errors import CheckpointError, ConfigError
from llmjax.model.config import ModelConfig, RopeScaling

LLAMA, QWEN2 = "LlamaForCausalLM", "Qwen2ForCausalLM"
# Reward models (head 'score', num_labels=1): the same transformer under `model.`, plus
# `score.weight [num_labels, d_model]` in place of lm_head.
LLAMA_REWARD, QWEN2_REWARD = "LlamaForSequenceClassification", "Qwen2ForSequenceClassification"
# Mixtures of experts: Mixtral (top-k renormalised, no shared expert) and Qwen2-MoE
# (Qwen1.5-MoE, Qwen2-57B-A14B: a sigmoid-gated shared expert, norm_topk_prob, QKV bias).
MIXTRAL, QWEN2_MOE = "MixtralForCausalLM", "Qwen2MoeForCausalLM"
SUPPORTED_ARCHITECTURES = (LLAMA, QWEN2, LLAMA_REWARD, QWEN2_REWARD, MIXTRAL, QWEN2_MOE)
_MODEL_TYPES = {LLAMA: "llama", QWEN2: "qwen2", LLAMA_REWARD: "llama", QWEN2_REWARD: "qwen2",
                MIXTRAL: "mixtral", QWEN2_MOE: "qwen2_moe"}
_HEADS = {LLAMA: "lm", QWEN2: "lm", LLAMA_REWARD: "score", QWEN2_REWARD: "score",
          MIXTRAL: "lm", QWEN2_MOE: "lm"}
# Each MoE block's HF module and the names of an expert's (gate, up, down) Linears.
_EXPERT_NAMES = {MIXTRAL: ("block_sparse_moe", "w1", "w3", "w2"),
                 QWEN2_MOE: ("mlp", "gate_proj", "up_proj", "down_proj")}
# transformers' defaults for config.json fields that Hub configs may omit.
_HF_ROUTER_AUX_LOSS_COEF = 0.001
# Tensors HF checkpoints may carry that hold nothing we need (old Llama saves the RoPE table).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

Path = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One HF tensor and where it lives in our parameter tree.

  `kind` names the layout change: 'same' (embedding, norms), 'linear' ([in, out] <-> [out, in]),
  'in_heads' (q/k/v `[d, heads, head_dim]` <-> `[heads*head_dim, d]`), 'out_heads' (o_proj
  `[heads, head_dim, d]` <-> `[d, heads*head_dim]`), 'bias' (`[heads, head_dim]` <-> flat).
  `expert` e: the HF tensor is slice `[e]` of our stacked expert parameter at `path`, and
  `shape` is that slice's.
  """
  hf_name: str
  path: Path
  kind: str
  shape: tuple[int, ...]  # ours
  hf_shape: tuple[int, ...]
  expert: int | None = None


def _linear(hf_name: str, path: Path, d_in: int, d_out: int,
            expert: int | None = None) -> TensorSpec:
  return TensorSpec(hf_name, path, "linear", (d_in, d_out), (d_out, d_in), expert)


def _dense_mlp_specs(pre: str, path: Path, d: int, f: int) -> list[TensorSpec]:
  """A SwiGLU MLP `pre{gate,up,down}_proj.weight` of width f."""
  return [_linear(pre + "gate_proj.weight", path + ("gate_proj",), d, f),
          _linear(pre + "up_proj.weight", path + ("up_proj",), d, f),
          _linear(pre + "down_proj.weight", path + ("down_proj",), f, d)]


def _mlp_specs(cfg: ModelConfig, layer: int, path: Path) -> list[TensorSpec]:
  """Layer `layer`'s MLP: dense, or router + experts (+ the gated shared expert). Experts
  are grouped by our parameter, so an exporter fetches each stacked parameter once."""
  d, pre = cfg.d_model, f"model.layers.{layer}."
  if not cfg.n_experts:
    return _dense_mlp_specs(pre + "mlp.", path, d, cfg.d_ff)
  block, *theirs = _EXPERT_NAMES[architecture_for(cfg)]
  f, n = cfg.resolved_d_ff_expert, cfg.n_experts
  specs = [_linear(f"{pre}{block}.gate.weight", path + ("router",), d, n)]
  for ours, their, (d_in, d_out) in zip(("gate_proj", "up_proj", "down_proj"), theirs,
                                        ((d, f), (d, f), (f, d))):
    specs += [_linear(f"{pre}{block}.experts.{e}.{their}.weight", path + (ours,), d_in, d_out, e)
              for e in range(n)]
  if cfg.d_ff_shared:  # Qwen2-MoE: architecture_for guarantees the gate
    specs += _dense_mlp_specs(pre + "mlp.shared_expert.", path + ("shared",), d,
                              cfg.d_ff_shared)
    specs.append(_linear(pre + "mlp.shared_expert_gate.weight", path + ("shared_gate",), d, 1))
  return specs


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
  """Every parameter of `cfg`'s model, in HF checkpoint order (an MoE layer's experts grouped
  by our parameter: all gate_proj slices, then up_proj, then down_proj)."""
  d, n, kv, h, v = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim,
                    cfg.vocab_size)
  specs = [TensorSpec("model.embed_tokens.weight", ("embed",), "same", (v, d), (v, d))]
  for i in range(cfg.n_layers):
    pre, p = f"model.layers.{i}.", ("layers", i)
    specs += [
        TensorSpec(pre + "input_layernorm.weight", p + ("input_norm", "weight"), "same",
                   (d,), (d,)),
        TensorSpec(pre + "self_attn.q_proj.weight", p + ("attn", "q_proj"), "in_heads",
                   (d, n, h), (n * h, d)),
        TensorSpec(pre + "self_attn.k_proj.weight", p + ("attn", "k_proj"), "in_heads",
                   (d, kv, h), (kv * h, d)),
        TensorSpec(pre + "self_attn.v_proj.weight", p + ("attn", "v_proj"), "in_heads",
                   (d, kv, h), (kv * h, d)),
    ]
    if cfg.qkv_bias:
      specs += [
          TensorSpec(pre + "self_attn.q_proj.bias", p + ("attn", "q_bias"), "bias", (n, h),
                     (n * h,)),
          TensorSpec(pre + "self_attn.k_proj.bias", p + ("attn", "k_bias"), "bias", (kv, h),
                     (kv * h,)),
          TensorSpec(pre + "self_attn.v_proj.bias", p + ("attn", "v_bias"), "bias", (kv, h),
                     (kv * h,)),
      ]
    specs += [
        TensorSpec(pre + "self_attn.o_proj.weight", p + ("attn", "o_proj"), "out_heads",
                   (n, h, d), (d, n * h)),
        TensorSpec(pre + "post_attention_layernorm.weight", p + ("post_attn_norm", "weight"),
                   "same", (d,), (d,)),
    ]
    specs += _mlp_specs(cfg, i, p + ("mlp",))
  specs.append(TensorSpec("model.norm.weight", ("final_norm", "weight"), "same", (d,), (d,)))
  if cfg.head == "score":
    specs.append(TensorSpec("score.weight", ("score",), "linear", (d, 1), (1, d)))
  elif not cfg.tie_embeddings:
    specs.append(TensorSpec("lm_head.weight", ("lm_head",), "linear", (d, v), (v, d)))
  return specs


def to_hf(spec: TensorSpec, x: np.ndarray) -> np.ndarray:
  """Our layout -> HF layout (a contiguous copy, as safetensors needs)."""
  if spec.kind in ("same", "bias"):
    out = x.reshape(spec.hf_shape)
  elif spec.kind == "linear":
    out = x.T
  elif spec.kind == "in_heads":
    out = x.reshape(x.shape[0], -1).T
  elif spec.kind == "out_heads":
    out = x.reshape(-1, x.shape[-1]).T
  else:
    raise AssertionError(spec.kind)
  return np.ascontiguousarray(out)


def from_hf(spec: TensorSpec, x: np.ndarray) -> np.ndarray:
  """HF layout -> our layout; CheckpointError naming the tensor if its shape is wrong."""
  if tuple(x.shape) != spec.hf_shape:
    raise CheckpointError(
        f"tensor {spec.hf_name} has shape {list(x.shape)} but config.json implies "
        f"{list(spec.hf_shape)}: the weights do not belong to this config.json")
  if spec.kind in ("same", "bias"):
    return x.reshape(spec.shape)
  if spec.kind == "linear":
    return np.ascontiguousarray(x.T)
  if spec.kind == "in_heads":
    return np.ascontiguousarray(x.T).reshape(spec.shape)
  if spec.kind == "out_heads":
    return np.ascontiguousarray(x.T).reshape(spec.shape)
  raise AssertionError(spec.kind)


def get_path(tree: Any, path: Path) -> Any:
  """The leaf of a nested params tree (nnx.State or dicts) at `path`, unwrapping Variables."""
  node = tree
  for key in path:
    node = node[key]
  return node.get_value() if hasattr(node, "get_value") else node


def iter_hf_tensors(params: Any, cfg: ModelConfig,
                    fetch: Callable[[Any], np.ndarray] = np.asarray,
                    dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields `(hf_name, array)` for each parameter, converting one tensor at a time.

  `fetch` turns a leaf into a host numpy array (e.g. a device_get that also gathers sharded
  arrays); `dtype` casts each tensor after the layout change. A LoRA export can pass a
  `fetch` that merges adapters into the base weight, or wrap this iterator to rename tensors.
  A stacked expert parameter is fetched once and yielded as its E per-expert tensors.
  """
  path, value = None, None
  for spec in tensor_specs(cfg):
    if spec.path != path:
      path, value = spec.path, fetch(get_path(params, spec.path))
      want = spec.shape if spec.expert is None else (cfg.n_experts, *spec.shape)
      if tuple(value.shape) != want:
        raise CheckpointError(f"parameter {'/'.join(map(str, spec.path))} has shape "
                              f"{list(value.shape)}, expected {list(want)} for this config")
    x = to_hf(spec, value if spec.expert is None else value[spec.expert])
    yield spec.hf_name, (x.astype(dtype) if dtype is not None else x)


def hf_tensor_names(cfg: ModelConfig) -> list[str]:
  return [s.hf_name for s in tensor_specs(cfg)]


def is_ignorable(hf_name: str, cfg: ModelConfig) -> bool:
  """HF tensors an import may skip: the RoPE table, and lm_head when it is tied."""
  if hf_name.endswith(_IGNORED_SUFFIXES):
    return True
  return cfg.tie_embeddings and hf_name == "lm_head.weight"


# ---- config.json <-> ModelConfig ------------------------------------------------------------


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  """(rope_theta, scaling) from classic `rope_theta`/`rope_scaling` or transformers-5
  `rope_parameters`."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or None
  if params and any(isinstance(v, dict) for v in params.values()):
    raise ConfigError("config.json rope_parameters differs per layer type; only one RoPE "
                      "setting for every layer is supported")
  theta = _field(hf, "rope_theta", float, params.get("rope_theta", 10_000.0))
  if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
    scaling = params
  if not scaling:
    return float(theta), None
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type == "default":
    return float(theta), None
  if rope_type != "llama3":
    raise ConfigError(f"config.json rope_scaling.rope_type={rope_type!r} is not supported; "
                      "supported: 'default' (none) and 'llama3'")
  try:
    return float(theta), RopeScaling(
        factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position=int(scaling["original_max_position_embeddings"]))
  except KeyError as e:
    raise ConfigError(f"config.json rope_scaling (llama3) lacks field {e.args[0]!r}") from None
  except (TypeError, ValueError):
    raise ConfigError(f"config.json rope_scaling={scaling!r} has a field that is not a "
                      "number: fix config.json") from None


def _check_supported(hf: dict[str, Any], arch: str) -> None:
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ConfigError(f"config.json hidden_act={act!r} is not supported: llmjax's MLP is "
                      "SwiGLU with silu")
  if hf.get("mlp_bias"):
    raise ConfigError("config.json mlp_bias=true is not supported: llmjax's MLP has no bias")
  model_type = _MODEL_TYPES[arch]
  if model_type == "llama" and hf.get("attention_bias"):
    raise ConfigError(f"config.json attention_bias=true is not supported for {arch} "
                      "(it adds an o_proj bias llmjax does not have)")
  if model_type in ("qwen2", "qwen2_moe"):
    layer_types = hf.get("layer_types") or []
    sliding = [i for i, t in enumerate(layer_types) if t != "full_attention"]
    if not layer_types and hf.get("use_sliding_window"):
      sliding = list(range(hf.get("max_window_layers", 0), hf["num_hidden_layers"]))
    if sliding:
      raise ConfigError(f"config.json use_sliding_window/layer_types enables sliding-window "
                        f"attention on layers {sliding}: not supported, only full attention")
  if model_type == "mixtral":
    _check_mixtral(hf)
  if model_type == "qwen2_moe":
    _check_qwen2_moe(hf)


def _check_mixtral(hf: dict[str, Any]) -> None:
  # transformers attends within sliding_window whenever it is set (Mixtral has no
  # use_sliding_window switch); a window as long as the context is full attention.
  window, context = hf.get("sliding_window"), hf.get("max_position_embeddings", 2048)
  if window is not None and window < context:
    raise ConfigError(f"config.json sliding_window={window} limits attention to the last "
                      f"{window} tokens (of max_position_embeddings={context}): not supported, "
                      "only full attention (sliding_window null)")
  # Training-only in transformers (the MoE input times uniform noise in [1-j, 1+j] under
  # model.train()), but part of how the config says to fine-tune: llmjax would silently
  # train without it, so it is refused rather than dropped.
  jitter = hf.get("router_jitter_noise") or 0.0
  if jitter > 0:
    raise ConfigError(f"config.json router_jitter_noise={jitter} is not supported: llmjax's "
                      "router has no jitter (transformers scales the MoE input by uniform noise "
                      f"in [1-{jitter}, 1+{jitter}] when training; inference is unaffected). "
                      "Set router_jitter_noise to 0.0 in config.json to import it, accepting "
                      "that fine-tuning in llmjax runs without jitter")


def _check_qwen2_moe(hf: dict[str, Any]) -> None:
  step = hf.get("decoder_sparse_step", 1)
  if step != 1:
    raise ConfigError(f"config.json decoder_sparse_step={step} makes only every {step}th layer "
                      "a mixture of experts and the others dense MLPs: not supported, every "
                      "llmjax layer is the same (decoder_sparse_step 1)")
  dense_layers = hf.get("mlp_only_layers") or []
  if dense_layers:
    raise ConfigError(f"config.json mlp_only_layers={dense_layers} gives those layers dense "
                      "MLPs between the mixture-of-experts layers: not supported, every llmjax "
                      "layer is the same (mlp_only_layers [])")
  shared = hf.get("shared_expert_intermediate_size")
  if shared is not None and shared <= 0:
    raise ConfigError(f"config.json shared_expert_intermediate_size={shared}: llmjax imports "
                      "Qwen2-MoE with its gated shared expert, which needs a positive width")


def _router_aux_loss_coef(hf: dict[str, Any]) -> float:
  """config.json's router_aux_loss_coef; 0.0 is a setting (no balancing loss), not unset."""
  if hf.get("router_aux_loss_coef") is None:
    return _HF_ROUTER_AUX_LOSS_COEF
  return _field(hf, "router_aux_loss_coef", float)


def _moe_fields(hf: dict[str, Any], arch: str) -> dict[str, Any]:
  """The ModelConfig fields of an MoE architecture (none for a dense one)."""
  if arch == MIXTRAL:
    return dict(n_experts=_field(hf, "num_local_experts", int),
                n_experts_per_token=_field(hf, "num_experts_per_tok", int), norm_topk_prob=True,
                router_aux_loss_coef=_router_aux_loss_coef(hf))
  if arch == QWEN2_MOE:
    return dict(n_experts=_field(hf, "num_experts", int),
                n_experts_per_token=_field(hf, "num_experts_per_tok", int),
                d_ff_expert=_field(hf, "moe_intermediate_size", int),
                d_ff_shared=_field(hf, "shared_expert_intermediate_size", int),
                shared_expert_gate=True,
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                router_aux_loss_coef=_router_aux_loss_coef(hf))
  return {}


def config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> ModelConfig:
  """ModelConfig of a `LlamaForCausalLM`, `Qwen2ForCausalLM`, `MixtralForCausalLM` or
  `Qwen2MoeForCausalLM` config.json dict, or of Llama/Qwen2 `*ForSequenceClassification` with
  num_labels=1 (head 'score'). `output_router_logits` (an output option) is ignored."""
  archs = hf.get("architectures") or []
  arch = archs[0] if len(archs) == 1 else None
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ConfigError(f"config.json architectures={archs} is not supported; supported "
                      f"architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
  _check_supported(hf, arch)
  head = _HEADS[arch]
  if head == "score":
    # transformers writes id2label/label2id and derives num_labels from them (default 2).
    labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
    if labels != 1:
      raise ConfigError(f"config.json is a {arch} with num_labels={labels}; only num_labels=1 "
                        "(a reward model: one scalar score per sequence) is supported")
  theta, scaling = _rope_from_hf(hf)
  model_type = _MODEL_TYPES[arch]
  n_heads = _field(hf, "num_attention_heads", int)
  d_model = _field(hf, "hidden_size", int)
  return ModelConfig(
      vocab_size=_field(hf, "vocab_size", int), d_model=d_model,
      n_layers=_field(hf, "num_hidden_layers", int), n_heads=n_heads,
      n_kv_heads=_field(hf, "num_key_value_heads", int, n_heads),
      d_ff=_field(hf, "intermediate_size", int),
      head_dim=_field(hf, "head_dim", int, d_model // max(n_heads, 1)),
      rope_theta=theta, rope_scaling=scaling, norm_eps=_field(hf, "rms_norm_eps", float, 1e-6),
      # Qwen2-MoE's qkv_bias key is new in transformers 5; older configs always had the bias.
      qkv_bias=model_type == "qwen2" or (model_type == "qwen2_moe" and
                                         bool(hf.get("qkv_bias", True))),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), head=head,
      max_seq_len=_field(hf, "max_position_embeddings", int, 2048), dtype=dtype,
      param_dtype=dtype, **_moe_fields(hf, arch))


_REQUIRED = object()


def _field(hf: dict[str, Any], key: str, kind: type, default: Any = _REQUIRED) -> Any:
  """config.json's `key` as an int or float; ConfigError naming the field when it is missing
  (and has no default) or not a number. Unset, null or 0 optional fields take the default."""
  value = hf.get(key)
  if value is None or (default is not _REQUIRED and not value):
    if default is _REQUIRED:
      raise ConfigError(f"config.json lacks required field {key!r}: the folder's config.json "
                        "must be the one save_pretrained wrote for these weights")
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      kind is int and not float(value).is_integer()):
    raise ConfigError(f"config.json {key}={value!r} is not "
                      f"{'an integer' if kind is int else 'a number'}: fix config.json "
                      "(save_pretrained writes numbers)")
  return kind(value)


def architecture_for(cfg: ModelConfig) -> str:
  """Qwen2 for QKV bias (Llama's attention_bias would also add an o_proj bias), else Llama;
  *ForSequenceClassification for a reward model (head 'score'), else *ForCausalLM. A mixture
  of experts is Qwen2-MoE with a gated shared expert, Mixtral without one; ConfigError for
  MoE shapes neither has."""
  if cfg.n_experts:
    return _moe_architecture(cfg)
  if cfg.head == "score":
    return QWEN2_REWARD if cfg.qkv_bias else LLAMA_REWARD
  return QWEN2 if cfg.qkv_bias else LLAMA


def _moe_architecture(cfg: ModelConfig) -> str:
  if cfg.head != "lm":
    raise ConfigError(f"a mixture-of-experts model with head {cfg.head!r} has no Hugging Face "
                      "architecture llmjax exports: MoE exports are causal LMs (head 'lm')")
  if cfg.d_ff_shared:
    if not cfg.shared_expert_gate:
      raise ConfigError(f"this MoE has a shared expert (d_ff_shared={cfg.d_ff_shared}) without "
                        "shared_expert_gate: Qwen2-MoE, the HF architecture with a shared "
                        "expert, always gates it; no HF architecture matches")
    return QWEN2_MOE
  problems = [p for p, bad in (("qkv_bias=True", cfg.qkv_bias),
                               ("norm_topk_prob=False", not cfg.norm_topk_prob)) if bad]
  if problems:
    raise ConfigError(f"this MoE has no shared expert and {' and '.join(problems)}: Mixtral, "
                      "the HF architecture without a shared expert, has no QKV bias and "
                      "renormalises the top-k weights; no HF architecture matches")
  return MIXTRAL


def config_to_hf(cfg: ModelConfig, dtype: str = "float32", bos_id: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None) -> dict[str, Any]:
  """config.json for `cfg`, readable by transformers 4.x (classic rope fields) and 5.x.

  A reward model gets num_labels=1 and pad_token_id (`pad_id`, else `eos_id`):
  *ForSequenceClassification finds each row's last token as the last one that is not
  pad_token_id, and refuses batches of more than one row without it.
  """
  arch = architecture_for(cfg)
  rope_scaling = None
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    rope_scaling = {"rope_type": "llama3", "factor": s.factor,
                    "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                    "original_max_position_embeddings": s.original_max_position}
  hf = {
      "architectures": [arch], "model_type": _MODEL_TYPES[arch],
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.resolved_head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
      # Both spellings: transformers <5 reads rope_theta/rope_scaling, 5.x folds them into
      # rope_parameters (and prefers rope_scaling when both are present, so they agree).
      "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                          **(rope_scaling or {})},
      "attention_dropout": 0.0, "use_cache": True, "torch_dtype": dtype,
      "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
  }
  if cfg.head == "score":
    hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
              pad_token_id=pad_id if pad_id is not None else eos_id)
  model_type = _MODEL_TYPES[arch]
  if model_type == "llama":
    hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
  elif model_type == "mixtral":
    hf.update(intermediate_size=cfg.resolved_d_ff_expert, num_local_experts=cfg.n_experts,
              num_experts_per_tok=cfg.n_experts_per_token, sliding_window=None,
              router_jitter_noise=0.0, router_aux_loss_coef=cfg.router_aux_loss_coef,
              output_router_logits=False)
  else:
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers,
              layer_types=["full_attention"] * cfg.n_layers)
  if model_type == "qwen2_moe":
    hf.update(num_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_token,
              moe_intermediate_size=cfg.resolved_d_ff_expert,
              shared_expert_intermediate_size=cfg.d_ff_shared,
              norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[],
              qkv_bias=cfg.qkv_bias, router_aux_loss_coef=cfg.router_aux_loss_coef,
              output_router_logits=False)
  return hf
