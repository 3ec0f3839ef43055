"""Decode throughput of `llmjax.sample.sampler.Sampler`.

CPU (default): against Hugging Face `transformers` `generate` (torch, KV cache, greedy) on the
same weights, batch 1 and 32; prints a markdown table with the ratio.

  python bench/sampler_throughput.py --preset=tiny
  python bench/sampler_throughput.py --preset=llama_100m --new_tokens=32

GPU/TPU (`--mode=bound`): a ~1B model (Llama-3.2-1B shape, random bf16 weights) against the
HBM-bandwidth bound: each decode step must read every weight and the KV cache once, so
tokens/s <= batch * bandwidth / (weight bytes + cache bytes).

  python bench/sampler_throughput.py --mode=bound            # one command on a GPU machine

Decode time is isolated as time(prompt + N new tokens) - time(prompt + 1 new token), both
after a warm-up call, so prefill and compile are excluded; the median of --repeats runs.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from llmjax.model.config import model_config
from llmjax.sample import kv_cache
from llmjax.sample.sampler import Sampler, decode_windows
from llmjax.train.loop import init_params

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "compare", ["compare", "bound"], "compare: vs transformers (CPU); "
                  "bound: vs the HBM bandwidth bound (accelerator).")
flags.DEFINE_string("preset", None, "Model preset (default: tiny for compare, llama3_1b for "
                    "bound).")
flags.DEFINE_list("batches", None, "Batch sizes (default 1,32; bound: 1,8,32,128).")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row.")
flags.DEFINE_integer("new_tokens", 64, "Tokens generated per row.")
flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median).")
flags.DEFINE_bool("windows", False, "compare: time decode in cache windows (the sampler) "
                  "against one whole-bucket window (the sampler before windows), interleaved in "
                  "one process, by wall and by process CPU time (robust to shared cores).")
flags.DEFINE_bool("hf", True, "compare: also time transformers (--nohf: llmjax only, e.g. to "
                  "compare two sampler versions).")
flags.DEFINE_float("hbm_bandwidth", None, "Bytes/s of the accelerator's memory (default: "
                   "from the device kind).")

# Data-sheet HBM bandwidth, bytes/s.
HBM_BANDWIDTH = {"NVIDIA H100": 3.35e12, "NVIDIA H200": 4.8e12, "NVIDIA A100": 2.0e12,
                 "TPU v5 lite": 0.82e12, "TPU v5p": 2.76e12, "TPU v4": 1.2e12,
                 "TPU v6 lite": 1.64e12}


def _median_seconds(fn, repeats: int) -> float:
  fn()  # warm-up (and compile)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
  rng = np.random.default_rng(0)
  return rng.integers(4, vocab, (batch, length)).tolist()


def llmjax_decode_tps(graphdef, params, batch: int) -> float:
  sampler = Sampler(graphdef, params, eos_ids=[], max_batch=max(batch, 1))
  prompts = _prompts(batch, FLAGS.prompt_len, 256)
  run = lambda n: lambda: jax.block_until_ready(sampler.sample(prompts, max_new_tokens=n).tokens)
  # Both lengths share one new-token bucket, hence one compiled program.
  full = _median_seconds(run(FLAGS.new_tokens), FLAGS.repeats)
  one = _median_seconds(run(1), FLAGS.repeats)
  return batch * (FLAGS.new_tokens - 1) / max(full - one, 1e-9)


def hf_model(cfg, params):
  import torch
  import transformers
  from llmjax.hf import convert
  hf_cfg = convert.config_to_hf(cfg, bos_id=2, eos_id=3, pad_id=0)
  config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_cfg.items()
                                                if k != "architectures"})
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  state = {name: torch.from_numpy(np.array(x)) for name, x in
           convert.iter_hf_tensors(params, cfg, fetch=lambda v: np.asarray(jax.device_get(v)))}
  if cfg.tie_embeddings:
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
  model.load_state_dict(state, strict=False)
  return model.eval()


def hf_decode_tps(model, batch: int) -> float:
  import torch
  prompts = torch.tensor(_prompts(batch, FLAGS.prompt_len, 256))
  mask = torch.ones_like(prompts)

  def run(n):
    def go():
      with torch.inference_mode():
        model.generate(prompts, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0, eos_token_id=None)
    return go
  full = _median_seconds(run(FLAGS.new_tokens), FLAGS.repeats)
  one = _median_seconds(run(1), FLAGS.repeats)
  return batch * (FLAGS.new_tokens - 1) / max(full - one, 1e-9)


def _check_same_greedy(graphdef, params, model) -> None:
  """Both engines must run the same model: their greedy continuations agree."""
  import torch
  prompt = _prompts(1, FLAGS.prompt_len, 256)
  ours = Sampler(graphdef, params, eos_ids=[]).sample(prompt, max_new_tokens=8).completion(0)
  with torch.inference_mode():
    theirs = model.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False,
                            pad_token_id=0, eos_token_id=None)[0, FLAGS.prompt_len:].tolist()
  if ours != theirs:
    raise SystemExit(f"llmjax and transformers disagree: {ours} vs {theirs}")


def _windows_vs_whole(graphdef, params, batch: int) -> dict[str, tuple[float, float]]:
  """{'whole'|'windowed': (wall tok/s, CPU tok/s)}, min over interleaved repeats."""
  from llmjax.sample import sampler as sampler_lib
  windowed = sampler_lib.decode_windows
  prompts = _prompts(batch, FLAGS.prompt_len, 256)
  runs = {}
  for name, windows in (("whole", lambda prompt_len, new_bucket: (new_bucket,)),
                        ("windowed", windowed)):
    sampler_lib.decode_windows = windows  # read at trace time: compile now, keep the program
    sampler = Sampler(graphdef, params, eos_ids=[], max_batch=max(batch, 1))
    program = jax.jit(sampler_lib._generate.__wrapped__, static_argnames=(
        "graphdef", "num_samples", "new_bucket", "greedy", "top_k_bucket", "use_top_p",
        "pad_id"))
    sampler_lib._generate, original = program, sampler_lib._generate
    try:
      for n in (FLAGS.new_tokens, 1):
        sampler.sample(prompts, max_new_tokens=n)  # compile + warm up
    finally:
      sampler_lib._generate = original
    runs[name] = (sampler, program)
  sampler_lib.decode_windows = windowed
  best = {name: [float("inf")] * 2 for name in runs}
  for _ in range(FLAGS.repeats):
    for name, (sampler, program) in runs.items():
      sampler_lib._generate, original = program, sampler_lib._generate
      try:
        spent = []
        for n in (FLAGS.new_tokens, 1):
          wall, cpu = time.perf_counter(), time.process_time()
          jax.block_until_ready(sampler.sample(prompts, max_new_tokens=n).tokens)
          spent.append((time.perf_counter() - wall, time.process_time() - cpu))
      finally:
        sampler_lib._generate = original
      for i in range(2):
        best[name][i] = min(best[name][i], spent[0][i] - spent[1][i])
  tokens = batch * (FLAGS.new_tokens - 1)
  return {name: tuple(tokens / max(t, 1e-9) for t in ts) for name, ts in best.items()}


def compare():
  cfg = model_config(FLAGS.preset or "tiny", {"dtype": "float32"})
  graphdef, params = init_params(cfg, seed=0)
  if FLAGS.windows:
    print(f"# {FLAGS.preset or 'tiny'}: prompt {FLAGS.prompt_len}, {FLAGS.new_tokens} new "
          f"tokens, greedy, float32; min of {FLAGS.repeats} interleaved runs")
    print("| batch | whole cache tok/s (wall / CPU) | windowed tok/s (wall / CPU) | CPU "
          "speedup |\n|---|---|---|---|")
    for batch in [int(b) for b in (FLAGS.batches or ["1", "32"])]:
      r = _windows_vs_whole(graphdef, params, batch)
      print(f"| {batch} | {r['whole'][0]:,.0f} / {r['whole'][1]:,.0f} | "
            f"{r['windowed'][0]:,.0f} / {r['windowed'][1]:,.0f} | "
            f"{r['windowed'][1] / r['whole'][1]:.2f}x |", flush=True)
    return
  if not FLAGS.hf:
    print(f"# {FLAGS.preset or 'tiny'}: {cfg.num_params() / 1e6:.1f}M params, prompt "
          f"{FLAGS.prompt_len}, {FLAGS.new_tokens} new tokens, greedy, float32; "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print("| batch | llmjax tok/s |\n|---|---|")
    for batch in [int(b) for b in (FLAGS.batches or ["1", "32"])]:
      print(f"| {batch} | {llmjax_decode_tps(graphdef, params, batch):,.0f} |", flush=True)
    return
  import torch
  model = hf_model(cfg, params)
  _check_same_greedy(graphdef, params, model)
  print(f"# {FLAGS.preset or 'tiny'}: {cfg.num_params() / 1e6:.1f}M params, prompt "
        f"{FLAGS.prompt_len}, {FLAGS.new_tokens} new tokens, greedy, float32; "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)")
  print("| batch | llmjax tok/s | transformers tok/s | ratio |\n|---|---|---|---|")
  for batch in [int(b) for b in (FLAGS.batches or ["1", "32"])]:
    ours, theirs = llmjax_decode_tps(graphdef, params, batch), hf_decode_tps(model, batch)
    print(f"| {batch} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f}x |", flush=True)


def bound():
  device = jax.devices()[0]
  bw = FLAGS.hbm_bandwidth or next(
      (v for k, v in sorted(HBM_BANDWIDTH.items(), key=lambda kv: -len(kv[0]))
       if device.device_kind.startswith(k)), None)
  if bw is None:
    raise SystemExit(f"unknown memory bandwidth of {device.device_kind}: pass --hbm_bandwidth")
  preset = FLAGS.preset or "llama3_1b"
  cfg = dataclasses.replace(model_config(preset, {"dtype": "bfloat16",
                                                  "param_dtype": "bfloat16"}))
  graphdef, params = init_params(cfg, seed=0)
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  # The tied embedding is read once as the output projection; the input lookup reads rows.
  print(f"# {preset}: {cfg.num_params() / 1e9:.2f}B params, bf16 ({weight_bytes / 1e9:.2f} GB), "
        f"{device.device_kind}, HBM {bw / 1e12:.2f} TB/s; prompt {FLAGS.prompt_len}, "
        f"{FLAGS.new_tokens} new tokens")
  print("| batch | decode tok/s | bound tok/s | fraction of bound |\n|---|---|---|---|")
  for batch in [int(b) for b in (FLAGS.batches or ["1", "8", "32", "128"])]:
    tps = llmjax_decode_tps(graphdef, params, batch)
    new_bucket = max(16, 1 << (FLAGS.new_tokens - 1).bit_length())
    prompt_bucket = max(16, 1 << (FLAGS.prompt_len - 1).bit_length())
    # What this sampler reads per step: the weights and the cache window of that step
    # (`decode_windows`), averaged over the timed steps 1..new_tokens-1.
    ends = decode_windows(prompt_bucket, new_bucket)
    windows = [prompt_bucket + next(e for e in ends if t < e)
               for t in range(1, FLAGS.new_tokens)]
    step_bytes = weight_bytes + kv_cache.cache_bytes(cfg, batch, sum(windows) / len(windows))
    limit = batch * bw / step_bytes
    print(f"| {batch} | {tps:,.0f} | {limit:,.0f} | {tps / limit:.0%} |", flush=True)


def main(_):
  compare() if FLAGS.mode == "compare" else bound()


if __name__ == "__main__":
  app.run(main)
