"""CPU training throughput: llmjax vs Hugging Face `transformers` LlamaForCausalLM (torch).

  python bench/pretrain_vs_transformers.py --d_model=256 --n_layers=4 --batch_size=8 --seq_len=256

Both train the same architecture (Llama: RMSNorm, RoPE, GQA, SwiGLU, untied embeddings) with
AdamW on the same random batches (one document per row, causal attention), fp32, in one
process. The two take turns, `--rounds` rounds of `--steps` steps each, so that load from
other jobs on a shared machine falls on both; each round's first step is not timed, and the
ratio is of the median step times.
"""

import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("vocab_size", 8192, "")
flags.DEFINE_integer("d_model", 256, "")
flags.DEFINE_integer("n_layers", 4, "")
flags.DEFINE_integer("n_heads", 8, "")
flags.DEFINE_integer("n_kv_heads", 4, "")
flags.DEFINE_integer("d_ff", 688, "")
flags.DEFINE_integer("batch_size", 8, "")
flags.DEFINE_integer("seq_len", 256, "")
flags.DEFINE_integer("steps", 5, "timed steps per round")
flags.DEFINE_integer("rounds", 4, "")


def batches():
  rng = np.random.default_rng(0)
  return [rng.integers(4, FLAGS.vocab_size, (FLAGS.batch_size, FLAGS.seq_len + 1), dtype=np.int64)
          for _ in range(FLAGS.steps + 1)]


def time_round(step, data) -> list[float]:
  step(data[0])
  times = []
  for b in data[1:]:
    t = time.perf_counter()
    step(b)
    times.append(time.perf_counter() - t)
  return times


def llmjax_step():
  import jax
  from flax import nnx
  from llmjax.model.config import ModelConfig
  from llmjax.train import loop
  from llmjax.train.losses import lm_objective
  from llmjax.train.optimizer import OptimizerConfig, build_optimizer, learning_rate_schedule

  cfg = ModelConfig(vocab_size=FLAGS.vocab_size, d_model=FLAGS.d_model, n_layers=FLAGS.n_layers,
                    n_heads=FLAGS.n_heads, n_kv_heads=FLAGS.n_kv_heads, d_ff=FLAGS.d_ff,
                    max_seq_len=FLAGS.seq_len)
  graphdef, params = loop.init_params(cfg, 0)
  opt = OptimizerConfig(grad_clip_norm=None, weight_decay=0.0)
  tx = build_optimizer(opt, 1000)
  state = loop.init_train_state({"policy": params}, tx)
  frozen = {"policy": nnx.State({})}
  fn = jax.jit(loop.make_train_step({"policy": graphdef}, tx, learning_rate_schedule(opt, 1000),
                                    lm_objective(), 1), donate_argnums=0)
  ones = np.ones((FLAGS.batch_size, FLAGS.seq_len), np.int32)
  positions = np.broadcast_to(np.arange(FLAGS.seq_len, dtype=np.int32), ones.shape)

  def step(b):
    nonlocal state
    batch = {"tokens": b[:, :-1].astype(np.int32), "targets": b[:, 1:].astype(np.int32),
             "loss_mask": ones, "segment_ids": ones, "positions": positions}
    state, m = fn(state, frozen, batch)
    jax.block_until_ready(m["loss"])
  return step


def torch_step():
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(0)
  cfg = LlamaConfig(vocab_size=FLAGS.vocab_size, hidden_size=FLAGS.d_model,
                    intermediate_size=FLAGS.d_ff, num_hidden_layers=FLAGS.n_layers,
                    num_attention_heads=FLAGS.n_heads, num_key_value_heads=FLAGS.n_kv_heads,
                    max_position_embeddings=FLAGS.seq_len, tie_word_embeddings=False)
  model = LlamaForCausalLM(cfg).train()
  opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)

  def step(b):
    t = torch.from_numpy(b)
    out = model(input_ids=t[:, :-1], labels=t[:, :-1].clone())  # HF shifts labels itself
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
  return step


def main(_):
  import torch
  data = batches()
  tokens = FLAGS.batch_size * FLAGS.seq_len
  steps = {"llmjax": llmjax_step(), "transformers": torch_step()}
  times = {name: [] for name in steps}
  for _ in range(FLAGS.rounds):
    for name, step in steps.items():
      times[name] += time_round(step, data)
  ours, theirs = np.median(times["llmjax"]), np.median(times["transformers"])
  print(f"| d={FLAGS.d_model} L={FLAGS.n_layers} h={FLAGS.n_heads}/{FLAGS.n_kv_heads} "
        f"ff={FLAGS.d_ff} V={FLAGS.vocab_size} | {FLAGS.batch_size}x{FLAGS.seq_len} | "
        f"{tokens / ours:,.0f} | {tokens / theirs:,.0f} | {theirs / ours:.2f}x | "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads |")


if __name__ == "__main__":
  app.run(main)
