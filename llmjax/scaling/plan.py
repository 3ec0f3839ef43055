"""From a compute budget to a run: the compute-optimal N and D, the nearest preset, a gin file.

The budget is split three ways (laws.py): Chinchilla's fitted law (approach 3), ~20 tokens per
parameter, and Kaplan et al. 2020. The preset closest to Chinchilla's N_opt (in log N) is
then given the whole budget: D = C / (FLOPs per token of that model), the FLOPs llmjax's MFU
counts (metrics.flops_per_token: 6 per matmul weight, plus attention). Batch size and peak
learning rate follow DeepSeek LLM's compute-based fits (Bi et al. 2024, eq. 1):
B_opt = 0.2920 C^0.3271 tokens, lr_opt = 0.3118 C^-0.1250 (AdamW, warmup then decay), a
starting point, not a tuned value.
"""

from __future__ import annotations

import dataclasses
import math

from llmjax import metrics
from llmjax.errors import ConfigError
from llmjax.model.config import PRESETS, ModelConfig
from llmjax.scaling import laws

# DeepSeek LLM (Bi et al. 2024), eq. (1).
BATCH_TOKENS_COEF, BATCH_TOKENS_EXP = 0.2920, 0.3271
LR_COEF, LR_EXP = 0.3118, -0.1250
MAX_WARMUP_STEPS = 2000


@dataclasses.dataclass(frozen=True)
class Plan:
  flops: float
  chinchilla: tuple[float, float]  # (N, D) of approach 3
  rule_of_20: tuple[float, float]
  kaplan: tuple[float, float]  # N non-embedding
  preset: str
  preset_params: int  # every parameter, as Chinchilla counts
  seq_len: int
  batch_size: int  # sequences per optimizer step
  steps: int
  tokens: int  # steps * batch_size * seq_len
  learning_rate: float
  warmup_steps: int

  @property
  def model(self) -> ModelConfig:
    return PRESETS[self.preset]


def nearest_preset(n: float, candidates: dict[str, ModelConfig] | None = None) -> str:
  """The dense language-model preset whose parameter count is closest to `n` in log scale
  (the fitted laws are of dense models; an MoE's N is not theirs)."""
  candidates = candidates or PRESETS
  return min((name for name, cfg in candidates.items()
              if cfg.head == "lm" and not cfg.n_experts),
             key=lambda name: abs(math.log(candidates[name].num_params() / n)))


def _power_of_two(x: float) -> int:
  return 2 ** max(0, round(math.log2(max(x, 1.0))))


def make_plan(flops: float, seq_len: int = 2048, preset: str | None = None) -> Plan:
  """The plan for `flops` training FLOPs; `preset` forces the model (default: the nearest)."""
  laws.compute_budget(flops)
  chinchilla = laws.optimal_allocation(flops)
  if preset is None:
    preset = nearest_preset(chinchilla[0])
  elif preset not in PRESETS:
    raise ConfigError(f"--preset={preset!r} is unknown; choose one of {sorted(PRESETS)}")
  cfg = PRESETS[preset]
  seq_len = min(seq_len, cfg.max_seq_len)
  batch_tokens = BATCH_TOKENS_COEF * flops ** BATCH_TOKENS_EXP
  batch_size = _power_of_two(batch_tokens / seq_len)
  tokens_per_step = batch_size * seq_len
  steps = max(1, round(flops / (metrics.flops_per_token(cfg, seq_len) * tokens_per_step)))
  return Plan(flops=flops, chinchilla=chinchilla,
              rule_of_20=laws.tokens_per_param_allocation(flops),
              kaplan=laws.kaplan_allocation(flops), preset=preset,
              preset_params=cfg.num_params(), seq_len=seq_len, batch_size=batch_size,
              steps=steps, tokens=steps * tokens_per_step,
              learning_rate=float(f"{LR_COEF * flops ** LR_EXP:.2g}"),
              warmup_steps=min(MAX_WARMUP_STEPS, max(1, steps // 10)))


def summary(plan: Plan) -> str:
  """The plan as a markdown table and the chosen run."""
  def row(name, n, d, note=""):
    loss = laws.chinchilla_loss(n, d)
    return f"| {name} | {n / 1e9:.3g}B | {d / 1e9:.3g}B | {d / n:.1f} | {loss:.3f} | {note} |"
  c = plan.flops
  lines = [f"Compute budget: {c:.3g} FLOPs ({c / laws.PF_DAY:.3g} PF-days)", "",
           "| allocation | N (params) | D (tokens) | D/N | Chinchilla L(N, D) | |",
           "|---|---|---|---|---|---|",
           row("Chinchilla approach 3 (L = E + A/N^a + B/D^b)", *plan.chinchilla,
               f"N ~ C^{laws.CHINCHILLA.a:.3f}"),
           row("20 tokens per parameter", *plan.rule_of_20, "Chinchilla table 3's ratio"),
           row("Kaplan et al. 2020", *plan.kaplan, "N non-embedding, ~ C^0.73"),
           row(f"preset {plan.preset!r} (nearest to approach 3's N)", plan.preset_params,
               plan.tokens, "the experiment file's run"), "",
           f"Run: preset {plan.preset} ({plan.preset_params:,} parameters), {plan.steps:,} steps "
           f"x {plan.batch_size} sequences x {plan.seq_len} tokens = {plan.tokens:.3g} tokens; "
           f"peak learning rate {plan.learning_rate:g}, warmup {plan.warmup_steps} steps, "
           "cosine to 10%."]
  return "\n".join(lines)


def experiment_gin(plan: Plan, budget_note: str = "") -> str:
  """A pretrain experiment file for the plan (same layout as experiments/*/pretrain.gin)."""
  note = f"\n# {budget_note.strip()}" if budget_note.strip() else ""
  big = plan.preset_params >= 1e9
  tiny_vocab = plan.model.vocab_size <= 4096
  overrides = "{}" if tiny_vocab else f"{{'dtype': 'bfloat16', 'max_seq_len': {plan.seq_len}}}"
  text = f"""# Written by `llmjax-scaling plan`: pretrain {plan.preset} on {plan.flops:.3g} FLOPs
# ({plan.tokens:.3g} tokens, {plan.tokens / plan.preset_params:.1f} per parameter).{note}
# Chinchilla approach 3's optimum for this budget: N = {plan.chinchilla[0]:.3g}, D = \
{plan.chinchilla[1]:.3g}.
#
#   llmjax-train --gin_file=THIS_FILE --workdir=/data/runs/NAME \\
#       --gin.TRAIN_FILES="['/data/corpus/*.jsonl']"{'' if tiny_vocab else
                                                   ' --gin.TOKENIZER=/data/tokenizer.json'}
#
# Batch and learning rate from DeepSeek LLM's compute fits: a starting point. Raise
# GRAD_ACCUM_STEPS until a microbatch fits in memory (the batch stays the same).

# ---- Must override ----
TRAIN_FILES = %gin.REQUIRED
"""
  if not tiny_vocab:
    text += "TOKENIZER = %gin.REQUIRED\n"
  text += f"""
# ---- Commonly overridden ----
DATA_FORMAT = 'jsonl'
SEQ_LEN = {plan.seq_len}
BATCH_SIZE = {plan.batch_size}
GRAD_ACCUM_STEPS = 1
TOTAL_STEPS = {plan.steps}
LEARNING_RATE = {plan.learning_rate:g}

pipeline.stages = ['pretrain']

pretrain.model = @model_config()
model_config.preset = '{plan.preset}'
model_config.overrides = {overrides}

pretrain.data = @DataConfig()
DataConfig.format = %DATA_FORMAT
DataConfig.train_paths = %TRAIN_FILES
DataConfig.field = 'text'
DataConfig.seq_len = %SEQ_LEN
DataConfig.batch_size = %BATCH_SIZE
DataConfig.eval_batches = 16

pretrain.train = @TrainConfig()
TrainConfig.total_steps = %TOTAL_STEPS
TrainConfig.grad_accum_steps = %GRAD_ACCUM_STEPS
TrainConfig.log_every = 10
TrainConfig.eval_every = {max(1, min(1000, plan.steps // 10))}
TrainConfig.checkpoint_every = {max(1, min(1000, plan.steps // 10))}
TrainConfig.keep_checkpoints = 3

pretrain.optimizer = @OptimizerConfig()
OptimizerConfig.learning_rate = %LEARNING_RATE
OptimizerConfig.warmup_steps = {plan.warmup_steps}
OptimizerConfig.min_lr_ratio = 0.1
OptimizerConfig.weight_decay = 0.1
OptimizerConfig.grad_clip_norm = 1.0

pretrain.tokenizer = @TokenizerConfig()
"""
  text += ("TokenizerConfig.model_type = 'bpe'  # trained on the training data\n" if tiny_vocab
           else "TokenizerConfig.path = %TOKENIZER\n")
  text += ("\n# Parameters and optimizer state sharded over every chip.\n"
           "MeshConfig.fsdp = -1\nMeshConfig.data = 1\n" if big else
           "\n# Data parallel over every chip.\nMeshConfig.data = -1\n")
  return text
