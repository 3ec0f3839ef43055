"""Memory of one compiled DPO and one GRPO train step, with and without chunked log-probs.

  python bench/logps_memory.py                         # Qwen2.5-0.5B, chunk sizes 0 and 512
  python bench/logps_memory.py --stages=grpo --chunk_sizes=0,128,512 --remat=full

Nothing is allocated: the policy (float32 parameters, bfloat16 compute, as
`experiments/qwen2_5_0_5b/{dpo,grpo_gsm8k}.gin`), its AdamW state and one microbatch are
ShapeDtypeStructs, and the loop's real step (`loop.make_train_step` with the stage's
objective, donated state) is lowered and compiled for them. The microbatches are those gin
files' (rows per step / grad_accum_steps): DPO 8 rows x 2048 tokens with the reference
log-probs precomputed into the batch (`dpo.precompute_reference`), so the step holds one
model; GRPO 64 completions (32 prompts x 8 / 4) of 256 prompt + 512 new tokens, dapo, beta 0
(no reference). XLA's buffer assignment (`memory_analysis()`) reports argument (state +
batch), output, temp (everything else live at once: activations, logits, gradients) and
alias (output reusing the donated state); peak ~ argument + output + temp - alias.

Without chunks the policy's float32 logits over every position (DPO) or every completion
position (GRPO's window), their softmax and gradient exist at once; with `--chunk_sizes=N`
(`TrainConfig.loss_chunk_size`) the output layer runs over N positions at a time inside a
rematerialized scan (`llmjax.train.losses.token_stats`).
"""

from __future__ import annotations

import os
import sys
import time

# The llmjax of this checkout, whatever is installed (bench/ is sys.path[0] for a script).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from llmjax.model.config import model_config  # noqa: E402
from llmjax.model.transformer import build_model  # noqa: E402
from llmjax.stages.dpo import PreferenceLoss, preference_objective  # noqa: E402
from llmjax.stages.grpo import GRPOConfig, grpo_objective  # noqa: E402
from llmjax.train import loop, roles  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "qwen2_5_0_5b", "Model preset.")
flags.DEFINE_list("stages", ["dpo", "grpo"], "Which steps to compile.")
flags.DEFINE_list("chunk_sizes", ["0", "512"], "TrainConfig.loss_chunk_size values (0: none).")
flags.DEFINE_integer("dpo_rows", 8, "DPO rows per microbatch (dpo.gin: 32 / 4).")
flags.DEFINE_integer("dpo_seq_len", 2048, "DPO tokens per row.")
flags.DEFINE_integer("grpo_rows", 64,
                     "GRPO completions per microbatch (grpo_gsm8k.gin: 32 x 8 / 4).")
flags.DEFINE_integer("grpo_prompt_tokens", 256, "PromptDataConfig.max_prompt_tokens.")
flags.DEFINE_integer("grpo_new_tokens", 512, "GRPOConfig.max_new_tokens (the window).")
flags.DEFINE_string("remat", "none", "ModelConfig.remat (the gin files leave it at 'none').")
flags.DEFINE_bool("scan_layers", True, "ModelConfig.scan_layers: one block to compile, not 24 "
                  "(saves the same activations).")

GIB = 1 << 30


def step_memory(stage: str, chunk_size: int) -> dict:
  cfg = model_config(FLAGS.preset, {"dtype": "bfloat16", "remat": FLAGS.remat,
                                    "scan_layers": FLAGS.scan_layers})
  graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
  tx = optax.adamw(1e-6)
  state = jax.eval_shape(lambda t: loop.init_train_state(t, tx), {roles.POLICY: params})
  frozen = {roles.POLICY: nnx.State({})}
  if stage == "dpo":
    shape = (FLAGS.dpo_rows, FLAGS.dpo_seq_len)
    keys = ("tokens", "targets", "positions", "segment_ids", "loss_mask", "pair_slot", "chosen")
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in keys}
    batch["ref_logps"] = jax.ShapeDtypeStruct(shape, jnp.float32)
    loss_fn = preference_objective(PreferenceLoss(), 4, precomputed=True,
                                   chunk_size=chunk_size)
  else:
    rows = FLAGS.grpo_rows
    shape = (rows, FLAGS.grpo_prompt_tokens + FLAGS.grpo_new_tokens)
    keys = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in keys}
    batch["sampler_logps"] = jax.ShapeDtypeStruct(shape, jnp.float32)
    batch["advantages"] = batch["fresh"] = jax.ShapeDtypeStruct((rows,), jnp.float32)
    loss_fn = grpo_objective(GRPOConfig(max_new_tokens=FLAGS.grpo_new_tokens,
                                        loss_type="dapo", epsilon_high=0.28), chunk_size)
  step = jax.jit(loop.make_train_step({roles.POLICY: graphdef}, tx,
                                      optax.constant_schedule(1e-6), loss_fn, 1),
                 donate_argnums=0)
  t0 = time.time()
  mem = step.lower(state, frozen, batch).compile().memory_analysis()
  arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  temp, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
  return {"arg": arg, "out": out, "temp": temp, "alias": alias,
          "peak": arg + out + temp - alias, "compile_s": time.time() - t0,
          "logits": shape[0] * (shape[1] if stage == "dpo" else FLAGS.grpo_new_tokens)
          * cfg.vocab_size * 4}


def main(argv):
  del argv
  cfg = model_config(FLAGS.preset)
  print(f"{FLAGS.preset}: {cfg.num_params() / 1e6:.0f}M parameters, vocab {cfg.vocab_size:,}, "
        f"remat {FLAGS.remat}, scan_layers {FLAGS.scan_layers}; {jax.default_backend()}, "
        f"jax {jax.__version__}\n")
  print("| step | loss_chunk_size | float32 logits | argument | output | temp | alias | peak "
        "| compile |")
  print("|---|---|---|---|---|---|---|---|---|")
  for stage in FLAGS.stages:
    for chunk in (int(c) for c in FLAGS.chunk_sizes):
      r = step_memory(stage, chunk)
      g = lambda k: f"{r[k] / GIB:.2f} GiB"
      print(f"| {stage} | {chunk or 'none'} | {g('logits')} | {g('arg')} | {g('out')} | "
            f"{g('temp')} | {g('alias')} | {g('peak')} | {r['compile_s']:.0f} s |", flush=True)


if __name__ == "__main__":
  app.run(main)
