"""GRPO step time: llmjax vs TRL's GRPOTrainer (torch) vs Tunix's GRPOLearner (JAX), on CPU.

  python bench/grpo_vs_peers.py                                   # tiny setting, 3 rounds
  python bench/grpo_vs_peers.py --setting=large --rounds=1 --steps=2 --warmup=1

The same GRPO step in the three frameworks, each in its own process (its own virtual
environment), taking turns: a round runs `--steps` measured steps of llmjax, then of TRL,
then of Tunix, and `--rounds` rounds follow each other, so load from other jobs on the
machine falls on all three. Each worker builds its model, runs `--warmup` untimed steps
(compilation, first allocations), then waits; the parent tells it to run a round's steps and
reads back their times as JSON. A step's time is the wall time from the start of one
optimizer step to the start of the next (rollout + reward + reference forward + loss,
backward and update + the framework's own per-step logging): the step each trainer repeats.
`gen` is the time in the framework's sampling call (llmjax `Sampler.sample`, TRL
`GRPOTrainer._generate`, Tunix `RLCluster.generate`); `rest` = step - gen.

The setting (both sizes, all three frameworks):
  model     Llama: RMSNorm, RoPE (theta 1e4), GQA, SwiGLU, untied embeddings, fp32, random
            init (seed 0). default: 2 layers, d_model 64, d_ff 128, 4 heads / 2 kv heads,
            vocab 256. large (llmjax's `llama_100m` preset): 12 layers, d_model 768,
            d_ff 2048, 12 / 4 heads, vocab 32000.
  tokens    a byte-level tokenizer (ids 0-255 are the bytes; ids above are filler tokens
            `<xN>`), the same tokenizer.json for all three; prompts are 16 ASCII bytes
            ("Prompt number 00", ...), so every prompt is 16 tokens and no prompt padding
            happens anywhere.
  rollout   default: 2 prompts x G=4 completions of 16 new tokens; large: 8 x 8 of 128.
            temperature 0.9, no top-k / top-p. No completion stops early: llmjax samples
            with no stop id, TRL with `min_new_tokens` = the budget (its eos is
            suppressed), Tunix with a stop id no model can sample. So every step trains on
            exactly prompts x G x budget completion tokens.
  reward    1 if the completion's text contains a lowercase ASCII vowel, else 0.
  loss      DAPO-style token-mean of the clipped policy loss (epsilon 0.2) plus beta=0.04
            x the k3 KL to a reference model (a second copy of the initial weights, one
            extra forward pass per step): llmjax loss_type='dapo', TRL loss_type='dapo',
            Tunix loss_agg_mode='token-mean' + kl_loss_mode='low_var_kl' (k3).
            num_iterations 1 (old log-probs = the current ones, detached).
  optimizer AdamW, lr 1e-6 constant, betas (0.9, 0.999), no weight decay, clip 1.0; one
            optimizer step per rollout, no gradient accumulation.

Virtual environments (TRL and Tunix are never imported by the parent or by llmjax's worker):

  python -m venv --system-site-packages /work/venvs/trl116      # reuses torch, transformers
  /work/venvs/trl116/bin/python -m pip install trl==1.16.0      # + accelerate, datasets
  python -m venv /work/venvs/tunix                              # its own jax/flax
  /work/venvs/tunix/bin/python -m pip install google-tunix==0.1.7

`--trl_python` / `--tunix_python` point elsewhere; llmjax's worker runs with this
interpreter and this checkout on PYTHONPATH. A peer that cannot start or fails is reported
with its reason (its stderr's last lines; the full log is in --logdir) and the others go on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = "@@grpo_bench "  # prefix of the workers' protocol lines on stdout
PEERS = ("llmjax", "trl", "tunix")

SETTINGS = {
    "default": dict(n_layers=2, d_model=64, d_ff=128, n_heads=4, n_kv_heads=2, vocab=256,
                    prompts=2, generations=4, new_tokens=16),
    "large": dict(n_layers=12, d_model=768, d_ff=2048, n_heads=12, n_kv_heads=4, vocab=32000,
                  prompts=8, generations=8, new_tokens=128),
}
COMMON = dict(prompt_tokens=16, temperature=0.9, beta=0.04, epsilon=0.2, lr=1e-6, seed=0,
              rope_theta=10_000.0, norm_eps=1e-5)


def setting(name: str) -> dict:
  s = {**SETTINGS[name], **COMMON}
  s["head_dim"] = s["d_model"] // s["n_heads"]
  s["prompt_texts"] = [f"Prompt number {i:02d}" for i in range(s["prompts"])]
  assert all(len(p) == s["prompt_tokens"] for p in s["prompt_texts"])
  return s


def has_vowel(text: str) -> float:
  """The verifiable reward every framework calls: 1 if the text has a lowercase vowel."""
  return float(any(c in "aeiou" for c in text))


# ---------------------------------------------------------------- the shared tokenizer


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (what tokenizers' ByteLevel uses)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {b: chr(c) for b, c in zip(bs, cs)}


EOS_PIECE = _bytes_to_unicode()[0]  # byte 0: never in a prompt; eos and pad of the tokenizer


def tokenizer_json(vocab_size: int) -> str:
  """A byte-level BPE tokenizer with no merges: id b is byte b; ids >= 256 are `<xN>`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
  vocab.update({f"<x{i}>": i for i in range(256, vocab_size)})
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  return tok.to_str()


def hf_tokenizer(vocab_size: int):
  from tokenizers import Tokenizer
  from transformers import PreTrainedTokenizerFast
  return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json(vocab_size)),
                                 eos_token=EOS_PIECE, pad_token=EOS_PIECE)


# ---------------------------------------------------------------- worker side


class Pacer:
  """Called at the start of every optimizer step (`tick`): times steps and pauses the
  framework's own loop between rounds, waiting for the parent's next command on stdin."""

  def __init__(self, warmup: int):
    self.warmup = warmup
    self.ticks = 0
    self.last: float | None = None
    self.gen = 0.0  # seconds in the sampling call since the last tick
    self.tokens: list[int] = []  # completion lengths since the last tick
    self.steps: list[dict] = []
    self.wanted = 0
    self.meta: dict = {}
    self.t_start = time.perf_counter()

  def add_gen(self, seconds: float, lengths) -> None:
    self.gen += seconds
    self.tokens.extend(int(n) for n in lengths)

  def tick(self) -> None:
    now = time.perf_counter()
    if self.last is not None:
      self.steps.append({"step_s": now - self.last, "gen_s": self.gen,
                         "completions": len(self.tokens),
                         "completion_tokens": int(sum(self.tokens))})
    self.gen, self.tokens = 0.0, []
    self.ticks += 1
    if self.ticks == self.warmup + 1:  # warm-up done: report, then wait
      emit({"ready": True, "warmup_steps": self.steps,
            "setup_and_warmup_s": now - self.t_start, **self.meta})
      self._wait()
    elif self.wanted and len(self.steps) >= self.wanted:
      emit({"steps": self.steps})
      self._wait()
    self.last = time.perf_counter()

  def _wait(self) -> None:
    self.steps = []
    line = sys.stdin.readline().split()
    if not line or line[0] == "quit":
      sys.stdout.flush()
      os._exit(0)  # the framework's loop would run on to its max_steps
    self.wanted = int(line[1])


def emit(msg: dict) -> None:
  sys.stdout.write(TAG + json.dumps(msg) + "\n")
  sys.stdout.flush()


def worker_llmjax(s: dict, pacer: Pacer, total_steps: int) -> None:
  import jax
  from llmjax import metrics as metrics_lib
  from llmjax.data.hf_tokenizer import HFTokenizer
  from llmjax.model.config import ModelConfig
  from llmjax.rl.rollouts import GroupAdvantages, Reward, RolloutConfig, RolloutSource
  from llmjax.sample.sampler import Sampler
  from llmjax.stages.grpo import GRPOConfig, grpo_objective
  from llmjax.train import loop, roles
  from llmjax.train.optimizer import OptimizerConfig

  cfg = ModelConfig(vocab_size=s["vocab"], d_model=s["d_model"], n_layers=s["n_layers"],
                    n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"], d_ff=s["d_ff"],
                    rope_theta=s["rope_theta"], norm_eps=s["norm_eps"],
                    max_seq_len=max(512, s["prompt_tokens"] + s["new_tokens"]))
  tok = HFTokenizer(tokenizer_json(s["vocab"]), {"eos": EOS_PIECE, "pad": EOS_PIECE})
  items = [{"prompt_ids": tok.encode(p), "answer": "", "question": p}
           for p in s["prompt_texts"]]

  class SamePrompts:
    """The same prompt group every step (state: nothing to resume)."""
    def __next__(self):
      return list(items)
    def get_state(self):
      return b"{}"
    def set_state(self, state):
      pass

  class TimedSampler:
    def __init__(self, sampler):
      self.sampler, self.graphdef = sampler, sampler.graphdef
    def sample(self, *args, **kwargs):
      t0 = time.perf_counter()
      out = self.sampler.sample(*args, **kwargs)
      pacer.add_gen(time.perf_counter() - t0, out.lengths.reshape(-1))
      return out

  class PacedSource(RolloutSource):
    def next_batch(self, view):
      pacer.tick()
      return super().next_batch(view)

  gcfg = GRPOConfig(num_generations=s["generations"], max_new_tokens=s["new_tokens"],
                    temperature=s["temperature"], loss_type="dapo", epsilon=s["epsilon"],
                    beta=s["beta"], num_iterations=1, rewards=("math_answer",))
  rcfg = RolloutConfig(gcfg.num_generations, gcfg.max_new_tokens, gcfg.temperature, 0, 1.0,
                       1, False, s["prompt_tokens"] + s["new_tokens"], s["seed"])
  # No stop id: every completion runs to the budget, as in the other two.
  source = PacedSource(SamePrompts(),
                       lambda gd, p: TimedSampler(Sampler(gd, p, tok, eos_ids=[])),
                       [Reward("has_vowel", lambda completion: has_vowel(completion))], rcfg,
                       GroupAdvantages(gcfg.num_generations))
  graphdef, params = loop.init_params(cfg, s["seed"])
  policy = roles.policy_role(cfg, init=params, seed=s["seed"])
  reference = roles.Role.frozen(graphdef, params, cfg)
  workdir = tempfile.mkdtemp(prefix="grpo_bench_llmjax_")
  train_cfg = loop.TrainConfig(total_steps=total_steps, log_every=1, eval_every=10**9,
                               checkpoint_every=10**9, seed=s["seed"])
  opt_cfg = OptimizerConfig(learning_rate=s["lr"], warmup_steps=0, min_lr_ratio=1.0,
                            weight_decay=0.0, b2=0.999, grad_clip_norm=1.0)
  writer = metrics_lib.MetricsWriter(workdir, "grpo", total_steps)
  pacer.meta = {"version": f"llmjax @ {_git_head()} (jax {jax.__version__})",
                "params": int(cfg.num_params()), "devices": str(jax.devices()),
                "workdir": workdir}
  loop.train(stage="grpo", workdir=workdir, policy=policy, roles={roles.REFERENCE: reference},
             loss_fn=grpo_objective(gcfg), train_data=source, eval_data=[],
             train_cfg=train_cfg, opt_cfg=opt_cfg, writer=writer)


def _git_head() -> str:
  try:
    return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
  except Exception:  # noqa: BLE001 -- only a label
    return "unknown"


def worker_trl(s: dict, pacer: Pacer, total_steps: int) -> None:
  import torch
  import transformers
  import trl
  from datasets import Dataset
  from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
  from trl import GRPOConfig, GRPOTrainer

  if os.environ.get("GRPO_BENCH_TORCH_THREADS"):
    torch.set_num_threads(int(os.environ["GRPO_BENCH_TORCH_THREADS"]))
  torch.manual_seed(s["seed"])
  mcfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["d_model"],
                     intermediate_size=s["d_ff"], num_hidden_layers=s["n_layers"],
                     num_attention_heads=s["n_heads"], num_key_value_heads=s["n_kv_heads"],
                     head_dim=s["head_dim"], max_position_embeddings=512,
                     rms_norm_eps=s["norm_eps"], rope_theta=s["rope_theta"],
                     tie_word_embeddings=False, bos_token_id=None, eos_token_id=0,
                     pad_token_id=0)
  tok = hf_tokenizer(s["vocab"])
  model_dir = tempfile.mkdtemp(prefix="grpo_bench_trl_model_")
  # The policy and the reference are both loaded from this folder (TRL builds the reference
  # from the policy's path), so they start from the same weights.
  LlamaForCausalLM(mcfg).to(torch.float32).save_pretrained(model_dir)
  tok.save_pretrained(model_dir)
  n_rows = s["prompts"] * s["generations"]
  args = GRPOConfig(
      output_dir=tempfile.mkdtemp(prefix="grpo_bench_trl_"), use_vllm=False, use_cpu=True,
      bf16=False, fp16=False, model_init_kwargs={"dtype": torch.float32},
      per_device_train_batch_size=n_rows, num_generations=s["generations"],
      generation_batch_size=n_rows, gradient_accumulation_steps=1,
      max_completion_length=s["new_tokens"], temperature=s["temperature"], top_p=1.0,
      generation_kwargs={"min_new_tokens": s["new_tokens"]},
      beta=s["beta"], epsilon=s["epsilon"], loss_type="dapo", num_iterations=1,
      learning_rate=s["lr"], lr_scheduler_type="constant", weight_decay=0.0,
      adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
      gradient_checkpointing=False, max_steps=total_steps, logging_steps=1,
      report_to="none", save_strategy="no", disable_tqdm=True, seed=s["seed"],
      dataloader_num_workers=0, shuffle_dataset=False)
  data = Dataset.from_dict({"prompt": s["prompt_texts"] * (total_steps + 4)})

  def reward(completions, **kwargs):
    return [has_vowel(c) for c in completions]

  trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=args, train_dataset=data,
                        processing_class=tok)
  generate = trainer._generate

  def timed_generate(prompts):
    t0 = time.perf_counter()
    out = generate(prompts)
    pacer.add_gen(time.perf_counter() - t0, [len(c) for c in out[1]])
    return out
  trainer._generate = timed_generate

  class Tick(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
      pacer.tick()

  trainer.add_callback(Tick())
  n_params = sum(p.numel() for p in trainer.model.parameters())
  pacer.meta = {"version": f"trl {trl.__version__} (torch {torch.__version__}, transformers "
                f"{transformers.__version__}, {torch.get_num_threads()} threads)",
                "params": int(n_params),
                "attn_implementation": trainer.model.config._attn_implementation}
  trainer.train()


def worker_tunix(s: dict, pacer: Pacer, total_steps: int) -> None:
  from importlib.metadata import version

  import jax
  import numpy as np
  import optax
  from flax import nnx
  from tunix.models.llama3 import model as llama3
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.grpo import grpo_learner
  from tunix.rl.rollout import base_rollout

  mcfg = llama3.ModelConfig(num_layers=s["n_layers"], vocab_size=s["vocab"],
                            embed_dim=s["d_model"], hidden_dim=s["d_ff"],
                            num_heads=s["n_heads"], head_dim=s["head_dim"],
                            num_kv_heads=s["n_kv_heads"], rope_theta=int(s["rope_theta"]),
                            norm_eps=s["norm_eps"], weight_tying=False)
  # Auto axes: the model's sharding annotations are hints (jax's default, Explicit, makes
  # Tunix's embedding gather fail to trace).
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with mesh:
    policy = llama3.Llama3(mcfg, rngs=nnx.Rngs(s["seed"]))
    reference = llama3.Llama3(mcfg, rngs=nnx.Rngs(s["seed"]))  # the same initial weights
  tok = hf_tokenizer(s["vocab"])
  seq = s["prompt_tokens"] + s["new_tokens"]
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(s["lr"], b1=0.9, b2=0.999, weight_decay=0.0))
  cluster_config = rl_cluster_lib.ClusterConfig(
      role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                    rl_cluster_lib.Role.ROLLOUT: mesh},
      rollout_engine="vanilla", offload_to_cpu=False,
      training_config=rl_cluster_lib.RLTrainingConfig(
          actor_optimizer=optimizer, eval_every_n_steps=10**9, max_steps=total_steps,
          checkpoint_root_directory=None),
      rollout_config=base_rollout.RolloutConfig(
          max_tokens_to_generate=s["new_tokens"], max_prompt_length=s["prompt_tokens"],
          kv_cache_size=seq, temperature=s["temperature"], top_p=1.0, top_k=None,
          # A stop id no model samples: every completion runs to the budget.
          eos_tokens=[-1]))
  cluster = rl_cluster_lib.RLCluster(actor=policy, reference=reference, tokenizer=tok,
                                     cluster_config=cluster_config)
  gcfg = grpo_learner.GRPOConfig(num_generations=s["generations"], num_iterations=1,
                                 beta=s["beta"], epsilon=s["epsilon"],
                                 loss_agg_mode="token-mean", kl_loss_mode="low_var_kl")

  def reward(prompts, completions, **kwargs):
    return [has_vowel(c) for c in completions]

  learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=gcfg, reward_fns=reward)
  generate = cluster.generate

  def timed_generate(*args, **kwargs):
    t0 = time.perf_counter()
    out = generate(*args, **kwargs)
    pacer.add_gen(time.perf_counter() - t0, [len(t) for t in out.tokens])
    return out
  cluster.generate = timed_generate

  def prompts():
    batch = {"prompts": np.asarray(s["prompt_texts"])}
    while True:
      pacer.tick()
      yield batch

  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(policy, nnx.Param)))
  pacer.meta = {"version": f"google-tunix {version('google-tunix')} (jax {jax.__version__}, "
                f"flax {version('flax')})", "params": int(n_params),
                "devices": str(jax.devices())}
  learner.train(prompts())


def run_worker(peer: str, setting_name: str, warmup: int, total_steps: int) -> None:
  # Anything a framework prints goes to stderr; stdout carries the protocol only.
  proto = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)
  sys.stdout = proto
  pacer = Pacer(warmup)
  try:
    {"llmjax": worker_llmjax, "trl": worker_trl, "tunix": worker_tunix}[peer](
        setting(setting_name), pacer, total_steps)
    emit({"error": f"the training loop returned after {pacer.ticks} steps (max_steps reached "
          "before the rounds ended)"})
  except BaseException as e:  # noqa: BLE001 -- reported to the parent, which goes on
    import traceback
    traceback.print_exc()
    emit({"error": f"{type(e).__name__}: {e}"[:2000]})
  sys.stdout.flush()
  os._exit(1)


# ---------------------------------------------------------------- parent side


class Worker:
  def __init__(self, peer: str, python: str, args, total_steps: int):
    self.peer, self.error = peer, None
    self.log_path = os.path.join(args.logdir, f"{peer}.log")
    cmd = [python, os.path.abspath(__file__), f"--worker={peer}", f"--setting={args.setting}",
           f"--warmup={args.warmup}", f"--total_steps={total_steps}"]
    env = dict(os.environ)
    if peer == "llmjax":
      env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    else:
      env.pop("PYTHONPATH", None)
    env["PYTHONUNBUFFERED"] = "1"
    if args.torch_threads:
      env["GRPO_BENCH_TORCH_THREADS"] = str(args.torch_threads)
    self.log = open(self.log_path, "w")
    self.timeout = args.timeout
    self.lines: queue.Queue = queue.Queue()
    try:
      self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=self.log, text=True, cwd=REPO, env=env)
    except OSError as e:
      self.proc, self.error = None, f"cannot start {python}: {e}"
      return
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      if line.startswith(TAG):
        self.lines.put(json.loads(line[len(TAG):]))
    self.lines.put(None)

  def receive(self) -> dict | None:
    """The worker's next message, or None (and self.error) when it died or timed out."""
    try:
      msg = self.lines.get(timeout=self.timeout)
    except queue.Empty:
      self.fail(f"no answer within {self.timeout} s")
      return None
    if msg is None or "error" in msg:
      self.fail((msg or {}).get("error", f"exited with code {self.proc.wait()}"))
      return None
    return msg

  def send(self, line: str) -> None:
    self.proc.stdin.write(line + "\n")
    self.proc.stdin.flush()

  def fail(self, why: str) -> None:
    self.log.flush()
    with open(self.log_path) as f:
      tail = [ln.rstrip() for ln in f.readlines() if ln.strip()][-6:]
    self.error = why + ("\n      " + "\n      ".join(tail) if tail else "")
    self.stop()

  def stop(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      try:
        self.send("quit")
        self.proc.wait(timeout=30)
      except Exception:  # noqa: BLE001 -- a stuck worker is killed below
        pass
      if self.proc.poll() is None:
        self.proc.kill()


def median(xs):
  return statistics.median(xs) if xs else float("nan")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--setting", choices=sorted(SETTINGS), default="default")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=8, help="measured steps per peer per round")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
  p.add_argument("--peers", default=",".join(PEERS))
  p.add_argument("--trl_python", default="/work/venvs/trl116/bin/python")
  p.add_argument("--tunix_python", default="/work/venvs/tunix/bin/python")
  p.add_argument("--keep_workers", type=int, default=None,
                 help="1: each worker lives through all rounds (compiles once); 0: one "
                 "worker at a time, started and warmed up again each round (less memory: "
                 "the default for --setting=large)")
  p.add_argument("--torch_threads", type=int, default=None,
                 help="torch.set_num_threads in TRL's worker; 0: torch's default (one per "
                 "core); default 1 for the tiny setting (2 threads on a shared 2-core machine "
                 "made its steps 10x slower), torch's default for --setting=large")
  p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for a worker")
  p.add_argument("--logdir", default=None)
  p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
  p.add_argument("--total_steps", type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    run_worker(args.worker, args.setting, args.warmup, args.total_steps)
    return
  if args.torch_threads is None:
    args.torch_threads = 1 if args.setting == "default" else 0
  keep = args.keep_workers if args.keep_workers is not None else args.setting != "large"
  args.logdir = args.logdir or tempfile.mkdtemp(prefix="grpo_bench_logs_")
  os.makedirs(args.logdir, exist_ok=True)
  peers = [x for x in args.peers.split(",") if x]
  python = {"llmjax": sys.executable, "trl": args.trl_python, "tunix": args.tunix_python}
  # The loops' step budgets: enough for every round; a worker is ended at its last round.
  total = args.warmup + (args.rounds if keep else 1) * args.steps + 2
  s = setting(args.setting)
  print(f"# GRPO step time, setting {args.setting}: {s['n_layers']} layers, d_model "
        f"{s['d_model']}, d_ff {s['d_ff']}, heads {s['n_heads']}/{s['n_kv_heads']}, vocab "
        f"{s['vocab']}, {s['prompts']} prompts x G={s['generations']} x {s['new_tokens']} new "
        f"tokens; {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up; "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}; logs in {args.logdir}", flush=True)

  workers: dict[str, Worker] = {}
  info: dict[str, dict] = {}
  steps: dict[str, list[dict]] = {x: [] for x in peers}
  errors: dict[str, str] = {}

  def start(peer: str) -> Worker | None:
    py = python[peer]
    if not os.path.exists(py):
      errors[peer] = (f"no interpreter at {py}: create the venv (see this script's docstring) "
                      f"or pass --{peer}_python")
      return None
    w = Worker(peer, py, args, total)
    if w.error is None:
      msg = w.receive()
      if msg is not None:
        info.setdefault(peer, {}).update(msg)
        warm = ", ".join(f"{x['step_s']:.2f}" for x in msg["warmup_steps"])
        print(f"  {peer}: ready after {msg['setup_and_warmup_s']:.1f} s "
              f"(warm-up steps: {warm} s)", flush=True)
        return w
    errors[peer] = w.error
    return None

  for r in range(args.rounds):
    for peer in peers:
      if peer in errors:
        continue
      w = workers.get(peer) or start(peer)
      if w is None:
        print(f"  {peer}: FAILED: {errors[peer]}", flush=True)
        continue
      workers[peer] = w
      w.send(f"run {args.steps}")
      msg = w.receive()
      if msg is None:
        errors[peer] = w.error
        print(f"  {peer}: FAILED in round {r + 1}: {w.error}", flush=True)
        continue
      steps[peer].extend(msg["steps"])
      med = median([x["step_s"] for x in msg["steps"]])
      print(f"  round {r + 1} {peer}: median step {med:.3f} s", flush=True)
      if not keep or r == args.rounds - 1:
        w.stop()
        del workers[peer]
  for w in workers.values():
    w.stop()

  print()
  print("| framework | median step | gen (sampling) | rest (ref fwd + loss, bwd, update, "
        "logging) | completion tokens / step | llmjax / this |")
  print("|---|---|---|---|---|---|")
  med = {x: median([y["step_s"] for y in steps[x]]) for x in peers if steps[x]}
  for peer in peers:
    if peer not in med:
      continue
    st = steps[peer]
    gen = median([y["gen_s"] for y in st])
    rest = median([y["step_s"] - y["gen_s"] for y in st])
    toks = sorted({y["completion_tokens"] for y in st})
    ratio = med["llmjax"] / med[peer] if "llmjax" in med else float("nan")
    print(f"| {peer} | {med[peer] * 1e3:.1f} ms | {gen * 1e3:.1f} ms | {rest * 1e3:.1f} ms | "
          f"{'/'.join(map(str, toks))} | {ratio:.2f}x |")
  others = [med[x] for x in med if x != "llmjax"]
  if "llmjax" in med and others:
    fastest = min(others)
    print(f"\nllmjax / faster peer: {med['llmjax'] / fastest:.2f}x (target <= 0.5x); "
          f"{len(steps['llmjax'])} llmjax steps, "
          + ", ".join(f"{len(steps[x])} {x}" for x in med if x != "llmjax"))
  print()
  for peer in peers:
    if peer in info:
      i = info[peer]
      print(f"- {peer}: {i.get('version')}, {i.get('params'):,} parameters"
            + (f", attention {i['attn_implementation']}" if "attn_implementation" in i else ""))
  for peer, why in errors.items():
    print(f"- {peer}: NOT MEASURED: {why}")


if __name__ == "__main__":
  main()
