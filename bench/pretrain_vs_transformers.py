"""CPU training throughput: llmjax vs Hugging Face `transformers` LlamaForCausalLM (torch).

  python bench/pretrain_vs_transformers.py --d_model=256 --n_layers=4 --batch_size=8 --seq_len=256

Both train the same architecture (Llama: RMSNorm, RoPE, GQA, SwiGLU, untied embeddings) with
AdamW on the same random batches (one document per row, causal attention), fp32, in one
process, one after the other. Steady state: median step time after two warm-up steps.
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
flags.DEFINE_integer("steps", 8, "")


def batches():
  rng = np.random.default_rng(0)
  return [rng.integers(4, FLAGS.vocab_size, (FLAGS.batch_size, FLAGS.seq_len + 1), dtype=np.int64)
          for _ in range(FLAGS.steps + 2)]


def time_steps(step, data) -> float:
  for b in data[:2]:
    step(b)
  times = []
  for b in data[2:]:
    t = time.perf_counter()
    step(b)
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def llmjax_step_time(data) -> float:
  import jax
  from llmjax.model.config import ModelConfig
  from llmjax.train import loop
  from llmjax.train.losses import lm_loss
  from llmjax.train.optimizer import OptimizerConfig, build_optimizer, learning_rate_schedule

  cfg = ModelConfig(vocab_size=FLAGS.vocab_size, d_model=FLAGS.d_model, n_layers=FLAGS.n_layers,
                    n_heads=FLAGS.n_heads, n_kv_heads=FLAGS.n_kv_heads, d_ff=FLAGS.d_ff,
                    max_seq_len=FLAGS.seq_len)
  graphdef, params = loop.init_params(cfg, 0)
  opt = OptimizerConfig(grad_clip_norm=None, weight_decay=0.0)
  tx = build_optimizer(opt, 1000)
  state = loop.init_train_state(params, tx)
  fn = jax.jit(loop.make_train_step(graphdef, tx, learning_rate_schedule(opt, 1000), lm_loss, 1),
               donate_argnums=0)
  ones = np.ones((FLAGS.batch_size, FLAGS.seq_len), np.int32)
  positions = np.broadcast_to(np.arange(FLAGS.seq_len, dtype=np.int32), ones.shape)

  def step(b):
    nonlocal state
    batch = {"tokens": b[:, :-1].astype(np.int32), "targets": b[:, 1:].astype(np.int32),
             "loss_mask": ones, "segment_ids": ones, "positions": positions}
    state, m = fn(state, batch)
    jax.block_until_ready(m["loss"])
  return time_steps(step, data)


def torch_step_time(data) -> float:
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
  return time_steps(step, data)


def main(_):
  import torch
  data = batches()
  tokens = FLAGS.batch_size * FLAGS.seq_len
  ours = llmjax_step_time(data)
  theirs = torch_step_time(data)
  print(f"| d={FLAGS.d_model} L={FLAGS.n_layers} h={FLAGS.n_heads}/{FLAGS.n_kv_heads} "
        f"ff={FLAGS.d_ff} V={FLAGS.vocab_size} | {FLAGS.batch_size}x{FLAGS.seq_len} | "
        f"{tokens / ours:,.0f} | {tokens / theirs:,.0f} | {theirs / ours:.2f}x | "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads |")


if __name__ == "__main__":
  app.run(main)
