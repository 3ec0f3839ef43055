"""One command for a GPU/TPU machine: the kernels compiled for real, and every accelerator bench.

  python bench/accelerator_check.py                   # GPU/TPU, about 8 minutes at most
  python bench/accelerator_check.py --smoke           # CPU: every part at tiny shapes
  bash bench/accelerator_check.sh [flags]             # the same, installing .whl/*.whl first

Parts, each in its own subprocess with its own timeout (a failure or a hang costs that part
alone), then ONE markdown table: part, status, key numbers, seconds.
  kernel_check   `lora_matmul` and `int4_matmul` (NF4, group 64) compiled with interpret=False
                 at M=4096, K=N=4096, r=16, bf16, forward and backward (dx, dA, dB; dx), against
                 float32 jnp references: max abs error, and that error over max |reference|.
  lora_memory    bench/lora_memory.py at llama3_1b (bf16 params, Pallas kernels): compiled
                 step memory of full FT vs LoRA vs QLoRA. It only compiles, so it runs beside
                 kernel_check (with XLA_PYTHON_CLIENT_PREALLOCATE=false) to save time.
  kernels        bench/kernels.py: int4 vs bf16 dot, fused LoRA vs unfused, vs measured HBM.
  pretrain       bench/pretrain_throughput.py --preset=llama3_1b --dtype=bfloat16
                 --attention=dot_product --remat=dots: tokens/s and MFU.
  sampler        bench/sampler_throughput.py --mode=bound: decode vs the HBM-bandwidth bound.
  lora_step      bench/lora_step_time.py at llama3_1b, bf16: LoRA step vs the frozen-base
                 step (target <= 1.10x) and full FT. remat=none: under 'dots' a Pallas LoRA
                 projection's output is not saved (it is neither a dot nor named), so it would
                 be recomputed in the backward and the ratio would measure that, not the kernel.
Every part's full output is written to --out_dir (one file per part, and summary.md).

On CPU it refuses unless --smoke is given; --smoke runs every part at tiny shapes, the Pallas
kernels in interpret mode, in under 3 minutes: a check that the command works, not numbers.

Dependencies: jax, flax, optax, orbax-checkpoint, absl-py, numpy. llmjax itself is imported
from this checkout (PYTHONPATH is set for every part), so it need not be installed. The
kernel parts import only `llmjax.kernels`. The others import `llmjax.model`, which needs
gin-config (every config class is `@gin.configurable`), and `llmjax.train.loop`, which imports
`llmjax.checkpoint` and so grain: neither is avoidable without changing llmjax. Where either
is missing, this script puts an import stub of it on the parts' PYTHONPATH and says so in the
table: the benches bind no gin parameters and never checkpoint, so the stubs change nothing
measured. To use the real packages instead, carry their wheels in .whl/ (for Python 3.12,
x86-64: gin_config 0.5.0, grain 0.2.18, array_record 0.8.6, portpicker 1.6.0; their other
needs come with jax/flax/orbax) and run bench/accelerator_check.sh, which installs them first.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_bool("smoke", False, "Tiny shapes, Pallas in interpret mode: for a CPU.")
flags.DEFINE_list("parts", None, "Run only these parts (default: all).")
flags.DEFINE_integer("budget_s", None, "Wall-clock budget for all parts; a part's timeout is "
                     "cut to what is left (default 470 s; 170 s with --smoke).")
flags.DEFINE_string("out_dir", "/tmp/llmjax_accelerator_check", "Where each part's output "
                    "and summary.md are written.")
flags.DEFINE_bool("kernel_check_only", False, "Internal: run the kernel_check part here.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
# max |kernel - reference| / max |reference| allowed: bf16 outputs round at ~2^-9 relative,
# and float32 accumulation over K=4096 keeps the rest well below this.
TOLERANCE = 2e-2


# ---- kernel_check (runs in its own subprocess: `--kernel_check_only`) -----------------------

def kernel_check(smoke: bool) -> bool:
  """Pallas kernels vs float32 references, forward and backward. True if all within tolerance."""
  import jax
  import jax.numpy as jnp
  from llmjax.kernels import (int4_matmul, int4_matmul_reference, lora_matmul,
                              lora_matmul_reference, quantize_int4)

  f32 = jnp.float32
  m, k, n, r = (64, 256, 256, 16) if smoke else (4096, 4096, 4096, 16)
  interpret = smoke  # never silently interpret on an accelerator
  scale = 2.0
  ks = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(ks[0], (m, k), f32).astype(jnp.bfloat16)
  w = (jax.random.normal(ks[1], (k, n), f32) / k**0.5).astype(jnp.bfloat16)
  a = (jax.random.normal(ks[2], (k, r), f32) / k**0.5).astype(jnp.bfloat16)
  # B nonzero (a fresh adapter's B is zero, which would hide the low-rank path's errors).
  b = (jax.random.normal(ks[3], (r, n), f32) * 0.1).astype(jnp.bfloat16)
  # A random cotangent: sum() would send the same dy to every output and test less.
  dy = jax.random.normal(ks[4], (m, n), f32).astype(jnp.bfloat16)
  up = lambda t: jax.tree.map(lambda v: v.astype(f32), t)
  ok = True

  def report(name, got, want, seconds):
    nonlocal ok
    err = float(jnp.max(jnp.abs(got.astype(f32) - want.astype(f32))))
    rel = err / max(float(jnp.max(jnp.abs(want.astype(f32)))), 1e-30)
    good = rel <= TOLERANCE
    ok &= good
    print(f"| {name} | {got.shape} {got.dtype} | {err:.3e} | {rel:.3e} | "
          f"{'ok' if good else 'FAIL'} | {seconds:.1f} s |", flush=True)
    return rel

  def timed(fn, *args):
    t0 = time.time()
    out = jax.block_until_ready(jax.jit(fn)(*args))
    return out, time.time() - t0

  print(f"kernel check on {jax.devices()[0].device_kind} ({jax.default_backend()}, "
        f"interpret={interpret}): M={m} K={k} N={n} r={r}, bf16 inputs, float32 references")
  print("| op | output | max abs err | / max abs ref | status | compile+run |")
  print("|---|---|---|---|---|---|")
  rels = {}

  kernel = lambda x, w, a, b: lora_matmul(x, w, a, b, scale, interpret=interpret)
  ref = lambda x, w, a, b: lora_matmul_reference(x, w, a, b, scale)
  y, s = timed(kernel, x, w, a, b)
  rels["lora fwd"] = report("lora_matmul fwd", y, ref(*up((x, w, a, b))), s)

  def grads(fn, x, w, a, b, dy):
    _, vjp = jax.vjp(lambda x, a, b: fn(x, w, a, b), x, a, b)
    return vjp(dy)
  g, s = timed(lambda *t: grads(kernel, *t), x, w, a, b, dy)
  g_ref = grads(ref, *up((x, w, a, b, dy)))
  rels["lora bwd"] = max(report(f"lora_matmul {name}", gk, gr, s if name == "dx" else 0.0)
                         for name, gk, gr in zip(("dx", "dA", "dB"), g, g_ref))

  q = quantize_int4(w, group_size=64, scheme="nf4")
  y, s = timed(lambda x, q: int4_matmul(x, q, interpret=interpret), x, q)
  # The reference dequantizes the same codes to float32: the error is the kernel's alone.
  rels["nf4 fwd"] = report("int4_matmul nf4 g64 fwd", y,
                           int4_matmul_reference(x.astype(f32), q), s)
  dx, s = timed(lambda x, q, dy: jax.vjp(lambda x: int4_matmul(x, q, interpret=interpret),
                                         x)[1](dy)[0], x, q, dy)
  dx_ref = jax.vjp(lambda x: int4_matmul_reference(x, q), x.astype(f32))[1](dy.astype(f32))[0]
  rels["nf4 bwd"] = report("int4_matmul nf4 g64 dx", dx, dx_ref, s)
  print("KEY " + ", ".join(f"{k} {v:.1e}" for k, v in rels.items())
        + f" (max abs err / max abs ref; tolerance {TOLERANCE:g})")
  return ok


# ---- Parts ------------------------------------------------------------------------------

@dataclasses.dataclass
class Part:
  name: str
  argv: list[str]
  timeout_s: int
  summarize: Callable[[str], str]
  env: dict[str, str] = dataclasses.field(default_factory=dict)
  needs_gin: bool = True  # imports llmjax.model (gin) and llmjax.train.loop (grain)
  beside_next: bool = False  # runs concurrently with the part after it


def _tables(text: str) -> list[list[dict[str, str]]]:
  """The markdown tables in `text`, each a list of {header: cell} rows."""
  tables, header = [], None
  for line in text.splitlines():
    if not line.startswith("|"):
      header = None
      continue
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if header is None:
      header = cells
      tables.append([])
    elif not set(line) <= set("|-: "):
      tables[-1].append(dict(zip(header, cells)))
  return tables


def _key_line(text: str) -> str:
  return next((l[4:] for l in text.splitlines() if l.startswith("KEY ")), "")


def _kernels_summary(text: str) -> str:
  out = []
  bw = re.search(r"Measured memory bandwidth.*?: ([\d,.]+ GB/s)", text)
  if bw:
    out.append(f"HBM {bw.group(1)}")
  tabs = _tables(text)
  int4 = next((t for t in tabs if t and "speedup" in t[0]), [])
  if int4:
    out.append("int4/bf16 " + ", ".join(f"M={r['M']}:{r['speedup']}" for r in int4
                                         if r["d_out"] == int4[0]["d_out"]))
    out.append(f"int4 %HBM max {max(int(r['% HBM'].rstrip('%')) for r in int4)}%")
  lora = next((t for t in tabs if t and "fwd+bwd pallas (us)" in t[0]), [])
  if lora:
    ratios = [float(r["fwd+bwd unfused (us)"].replace(",", ""))
              / float(r["fwd+bwd pallas (us)"].replace(",", "")) for r in lora]
    out.append(f"LoRA fwd+bwd unfused/fused {min(ratios):.2f}-{max(ratios):.2f}x")
  return "; ".join(out)


def _pretrain_summary(text: str) -> str:
  # pretrain_throughput.py prints its row without a header (RESULTS.md holds the header).
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("|") and len(cells) == 10:
      model, _, compute, batch, step, tps, flops, mfu, compile_s, _ = cells
      return (f"{model} {compute} {batch}: {step}, {tps} tok/s, {flops}, MFU {mfu}, "
              f"compile {compile_s}")
  return ""


def _sampler_summary(text: str) -> str:
  rows = [r for t in _tables(text) for r in t if "fraction of bound" in r]
  return ", ".join(f"b{r['batch']} {r['decode tok/s']} tok/s ({r['fraction of bound']})"
                   for r in rows)


def _step_summary(text: str) -> str:
  rows = [r for t in _tables(text) for r in t if "vs frozen" in r]
  return ", ".join(f"{r['variant']} {r['step']} ({r['vs frozen']})" for r in rows)


def _memory_summary(text: str) -> str:
  rows = [r for t in _tables(text) for r in t if "peak GiB" in r]
  return ", ".join(f"{r['variant']} {r['peak GiB']} GiB ({r['vs full']})" for r in rows)


def parts(smoke: bool) -> list[Part]:
  py = sys.executable
  bench = lambda script, *args: [py, os.path.join(BENCH, script), *args]
  if smoke:
    return [
        Part("kernel_check", [py, os.path.abspath(__file__), "--kernel_check_only",
                              "--smoke"], 60, _key_line, needs_gin=False),
        Part("lora_memory", bench("lora_memory.py", "--presets=tiny", "--seq_len=256",
                                  "--param_dtypes=bfloat16", "--lora_kernel=pallas",
                                  "--quant_kernel=pallas"), 120, _memory_summary),
        Part("kernels", bench("kernels.py", "--smoke"), 60, _kernels_summary, needs_gin=False),
        Part("pretrain", bench("pretrain_throughput.py", "--preset=tiny", "--batch_size=2",
                               "--seq_len=64", "--steps=2"), 60, _pretrain_summary),
        Part("sampler", bench("sampler_throughput.py", "--mode=bound", "--preset=tiny",
                              "--hbm_bandwidth=1e11", "--batches=1,2", "--prompt_len=8",
                              "--new_tokens=8", "--repeats=1"), 60, _sampler_summary),
        Part("lora_step", bench("lora_step_time.py", "--presets=tiny", "--batch_size=2",
                                "--seq_len=64", "--steps=2", "--rounds=1",
                                "--lora_kernel=pallas", "--variants=frozen,lora,full"),
             90, _step_summary),
    ]
  return [
      Part("kernel_check", [py, os.path.abspath(__file__), "--kernel_check_only"], 90,
           _key_line, needs_gin=False),
      Part("lora_memory", bench("lora_memory.py", "--presets=llama3_1b",
                                "--param_dtypes=bfloat16", "--steady_state"), 120,
           _memory_summary, env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}),
      Part("kernels", bench("kernels.py"), 100, _kernels_summary, needs_gin=False),
      Part("pretrain", bench("pretrain_throughput.py", "--preset=llama3_1b",
                             "--dtype=bfloat16", "--attention=dot_product", "--remat=dots",
                             "--batch_size=8", "--seq_len=2048", "--steps=5"), 100,
           _pretrain_summary),
      Part("sampler", bench("sampler_throughput.py", "--mode=bound", "--repeats=2"), 80,
           _sampler_summary),
      Part("lora_step", bench("lora_step_time.py", "--presets=llama3_1b", "--dtype=bfloat16",
                              "--param_dtype=bfloat16", "--attention=dot_product",
                              "--remat=none", "--scan_layers", "--batch_size=4",
                              "--seq_len=2048", "--steps=5", "--rounds=2",
                              "--variants=frozen,lora,full"), 120, _step_summary),
  ]


# ---- Running them -----------------------------------------------------------------------

_GIN_STUB = '''"""Import stub of gin-config (bench/accelerator_check.py): no bindings are used."""
def configurable(*args, **kwargs):
  if len(args) == 1 and callable(args[0]) and not kwargs:
    return args[0]
  return lambda fn: fn
'''
_GRAIN_STUB = '''"""Import stub of grain (bench/accelerator_check.py): nothing checkpoints."""
def __getattr__(name):
  raise ImportError(f"grain.{name}: grain is not installed here (an import stub stands in)")
'''


def _stub_dir() -> tuple[str | None, list[str]]:
  """A directory of stubs for whichever of gin/grain is missing, and their names."""
  missing = [name for name, mod in (("gin-config", "gin"), ("grain", "grain"))
             if importlib.util.find_spec(mod) is None]
  if not missing:
    return None, []
  root = tempfile.mkdtemp(prefix="llmjax_stubs_")
  for name, src in (("gin-config", ("gin", _GIN_STUB)), ("grain", ("grain", _GRAIN_STUB))):
    if name in missing:
      os.makedirs(os.path.join(root, src[0]))
      with open(os.path.join(root, src[0], "__init__.py"), "w") as f:
        f.write(src[1])
  return root, missing


def _env(part: Part, stubs: str | None) -> dict[str, str]:
  env = dict(os.environ, PYTHONUNBUFFERED="1", **part.env)
  path = [REPO] + ([stubs] if stubs and part.needs_gin else [])
  env["PYTHONPATH"] = os.pathsep.join(path + [p for p in [env.get("PYTHONPATH")] if p])
  return env


class Running:
  """One part's subprocess (its own process group, so a timeout ends all of it)."""

  def __init__(self, part: Part, timeout_s: float, stubs: str | None, log_dir: str):
    self.part, self.timeout_s = part, timeout_s
    self.log_path = os.path.join(log_dir, f"{part.name}.log")
    self.log = open(self.log_path, "w")
    self.start = time.time()
    self.proc = subprocess.Popen(part.argv, cwd=REPO, env=_env(part, stubs), stdout=self.log,
                                 stderr=subprocess.STDOUT, start_new_session=True)

  def wait(self) -> dict[str, str]:
    try:
      rc = self.proc.wait(timeout=max(self.timeout_s - (time.time() - self.start), 1))
      status = "ok" if rc == 0 else f"failed (rc {rc})"
    except subprocess.TimeoutExpired:
      os.killpg(self.proc.pid, signal.SIGKILL)
      self.proc.wait()
      status = f"timeout ({self.timeout_s:.0f} s)"
    seconds = time.time() - self.start
    self.log.close()
    with open(self.log_path) as f:
      text = f.read()
    try:
      key = self.part.summarize(text)
    except Exception as e:  # a part's odd output must not sink the table
      key = f"(could not read its output: {e})"
    if status != "ok":
      lines = [l.strip() for l in text.splitlines() if l.strip()]
      why = next((l for l in reversed(lines) if "Error" in l or "error" in l),
                 "no error printed" if status.startswith("failed") else "still running")
      key = f"{key}; {why[:200]}" if key else why[:200]
    key = key.replace("|", "\\|")  # a cell of the summary table
    print(f"\n===== {self.part.name}: {status}, {seconds:.0f} s ({self.log_path}) =====\n"
          f"{text}", flush=True)
    return {"part": self.part.name, "status": status, "key": key or "-",
            "seconds": f"{seconds:.0f}"}


def _probe() -> tuple[str, str]:
  """(backend, description) from a short subprocess, so this process never holds the device
  (jax preallocates most of a GPU's memory in the first process that touches it)."""
  code = ("import jax; d = jax.devices(); print(jax.default_backend()); "
          "print(f'{len(d)}x {d[0].device_kind}, jax {jax.__version__}')")
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
  if out.returncode:
    raise SystemExit(f"could not start jax:\n{out.stderr[-2000:]}")
  backend, desc = out.stdout.strip().splitlines()[-2:]
  return backend, desc


def main(_):
  if FLAGS.kernel_check_only:
    sys.exit(0 if kernel_check(FLAGS.smoke) else 1)
  t_start = time.time()
  backend, desc = _probe()
  if backend == "cpu" and not FLAGS.smoke:
    print(f"No GPU or TPU here ({desc}): this check measures accelerators. Run it on one, or "
          "pass --smoke to run every part at tiny shapes on the CPU (a check that the "
          "command works; its numbers mean nothing).")
    sys.exit(2)
  budget = FLAGS.budget_s or (170 if FLAGS.smoke else 470)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  stubs, missing = _stub_dir()
  todo = [p for p in parts(FLAGS.smoke) if not FLAGS.parts or p.name in FLAGS.parts]
  # The memory part only compiles: it runs beside the kernel check, which checks numbers
  # and times nothing, so neither distorts the other.
  by_name = {p.name: p for p in todo}
  if "kernel_check" in by_name and "lora_memory" in by_name:
    todo.remove(by_name["lora_memory"])
    todo.insert(0, by_name["lora_memory"])
    by_name["lora_memory"].beside_next = True
  header = (f"# accelerator check: {desc}, backend {backend}"
            f"{', SMOKE (tiny shapes, Pallas interpret mode)' if FLAGS.smoke else ''}"
            f"{'; import stubs for ' + ', '.join(missing) if missing else ''}")
  print(header, flush=True)
  rows, pending = [], []
  for part in todo:
    left = budget - (time.time() - t_start)
    if left < 10:
      rows.append({"part": part.name, "status": "skipped (budget)", "key": "-",
                   "seconds": "0"})
      continue
    run = Running(part, min(part.timeout_s, left), stubs, FLAGS.out_dir)
    if part.beside_next:
      pending.append(run)
      continue
    rows.append(run.wait())
    while pending:
      rows.append(pending.pop().wait())
  order = {p.name: i for i, p in enumerate(parts(FLAGS.smoke))}
  rows.sort(key=lambda r: order[r["part"]])
  table = [header, "", "| part | status | key numbers | seconds |", "|---|---|---|---|"]
  table += [f"| {r['part']} | {r['status']} | {r['key']} | {r['seconds']} |" for r in rows]
  table.append(f"\ntotal {time.time() - t_start:.0f} s; logs in {FLAGS.out_dir}")
  summary = "\n".join(table)
  with open(os.path.join(FLAGS.out_dir, "summary.md"), "w") as f:
    f.write(summary + "\n")
  print("\n" + summary)
  if stubs:
    shutil.rmtree(stubs, ignore_errors=True)
  sys.exit(0 if all(r["status"] == "ok" for r in rows) else 1)


if __name__ == "__main__":
  app.run(main)
