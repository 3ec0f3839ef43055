"""Run llmjax-train on a Cloud TPU VM or multi-host slice through gcloud.

  python launch/tpu_vm.py all --name=l3 --zone=us-east5-b --accelerator_type=v5litepod-16 \
      --workdir=gs://bucket/runs/l3 -- --gin_file=experiments/llama3_1b/pretrain.gin \
      --gin.MeshConfig.fsdp=-1 --gin.MeshConfig.data=1
  python launch/tpu_vm.py delete --name=l3 --zone=us-east5-b
  python launch/tpu_vm.py all ... --dry_run     # print every gcloud command, run none

Actions: create (or --queued: a queued resource, waited on until ACTIVE), setup (copy this
checkout to every worker and `pip install -e .[tpu]`), run (llmjax-train on every worker,
logs streamed here and kept in ~/llmjax_train.log on each), logs (follow worker 0's log),
delete, and all (create, setup, run; add --delete_after to delete when the run ends).
Arguments after `--` go to llmjax-train.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time

# Runtime (software) versions per TPU generation, from the Cloud TPU docs.
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",  # v5e
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
REMOTE_DIR = "~/llmjax"
LOG = "~/llmjax_train.log"


def runtime_version(accelerator_type: str) -> str:
  for prefix, version in RUNTIME_VERSIONS.items():
    if accelerator_type.startswith(prefix):
      return version
  raise SystemExit(f"unknown TPU type {accelerator_type!r}: pass --runtime_version (known "
                   f"generations: {', '.join(RUNTIME_VERSIONS)})")


def _where(args) -> list[str]:
  out = [f"--zone={args.zone}"]
  if args.project:
    out.append(f"--project={args.project}")
  return out


def _ssh(args, command: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_where(args),
          f"--worker={worker}", f"--command={command}"]


def create_commands(args) -> list[list[str]]:
  version = args.runtime_version or runtime_version(args.accelerator_type)
  spot = ["--spot"] if args.spot else []
  if args.queued:
    return [["gcloud", "compute", "tpus", "queued-resources", "create", f"{args.name}-qr",
             f"--node-id={args.name}", *_where(args), f"--accelerator-type={args.accelerator_type}",
             f"--runtime-version={version}", *spot]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_where(args),
           f"--accelerator-type={args.accelerator_type}", f"--version={version}", *spot]]


def queued_state_command(args) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "describe", f"{args.name}-qr",
          *_where(args), "--format=value(state.state)"]


def setup_commands(args) -> list[list[str]]:
  # Ship exactly the committed files (no venvs, runs or caches) as one tarball.
  tarball = f"/tmp/{args.name}-llmjax.tar.gz"
  return [
      ["git", "-C", args.source, "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{args.name}:/tmp/llmjax.tar.gz",
       *_where(args), "--worker=all"],
      _ssh(args, f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
                 f"tar -xzf /tmp/llmjax.tar.gz -C {REMOTE_DIR} && cd {REMOTE_DIR} && "
                 "python3 -m pip install -q -U pip && python3 -m pip install -q -e '.[tpu]'"),
  ]


def run_command(args, train_args: list[str]) -> list[str]:
  train = ["llmjax-train", f"--workdir={args.workdir}", "--jax_distributed", *train_args]
  # `python3 -m` avoids depending on ~/.local/bin being on PATH in a non-login ssh shell.
  line = (f"cd {REMOTE_DIR} && python3 -m llmjax.cli.train {shlex.join(train[1:])} "
          f"2>&1 | tee -a {LOG}")
  return _ssh(args, line)


def logs_command(args) -> list[str]:
  return _ssh(args, f"tail -n 200 -f {LOG}", worker="0")


def delete_commands(args) -> list[list[str]]:
  if args.queued:
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", f"{args.name}-qr",
             *_where(args), "--force", "--quiet"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_where(args), "--quiet"]]


def plan(args, train_args: list[str]) -> list[list[str]]:
  """Every command the action runs, in order (the queued-resource wait is a poll of
  `queued_state_command`, shown once)."""
  steps: list[list[str]] = []
  if args.action in ("create", "all"):
    steps += create_commands(args)
    if args.queued:
      steps.append(queued_state_command(args))
  if args.action in ("setup", "all"):
    steps += setup_commands(args)
  if args.action in ("run", "all"):
    steps.append(run_command(args, train_args))
  if args.action == "logs":
    steps.append(logs_command(args))
  if args.action == "delete" or (args.action == "all" and args.delete_after):
    steps += delete_commands(args)
  return steps


def execute(args, steps: list[list[str]]) -> None:
  for cmd in steps:
    print("+ " + shlex.join(cmd), flush=True)
    if args.dry_run:
      continue
    if cmd == queued_state_command(args):
      while True:
        state = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        print(f"  queued resource state: {state}", flush=True)
        if state == "ACTIVE":
          break
        if state in ("FAILED", "SUSPENDED"):
          raise SystemExit(f"queued resource {args.name}-qr is {state}")
        time.sleep(30)
      continue
    subprocess.run(cmd, check=True)  # output streams straight to this terminal


def parse(argv: list[str]):
  if "--" in argv:
    i = argv.index("--")
    argv, train_args = argv[:i], argv[i + 1:]
  else:
    train_args = []
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("action", choices=["create", "setup", "run", "logs", "delete", "all"])
  p.add_argument("--name", required=True, help="TPU VM (node) name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default=None)
  p.add_argument("--accelerator_type", default="v5litepod-8",
                 help="e.g. v4-32, v5litepod-16, v5p-64, v6e-16")
  p.add_argument("--runtime_version", default=None, help="default: by TPU generation")
  p.add_argument("--queued", action="store_true", help="create through a queued resource")
  p.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
  p.add_argument("--source", default=".", help="git checkout to ship (its HEAD)")
  p.add_argument("--workdir", default="runs/llmjax",
                 help="run directory, relative to the checkout on each worker; gs:// for pods")
  p.add_argument("--delete_after", action="store_true", help="with 'all': delete at the end")
  p.add_argument("--dry_run", action="store_true", help="print the gcloud commands only")
  args = p.parse_args(argv)
  if args.action in ("create", "all"):
    args.runtime_version = args.runtime_version or runtime_version(args.accelerator_type)
  return args, train_args


def main(argv: list[str]) -> None:
  args, train_args = parse(argv)
  steps = plan(args, train_args)
  try:
    execute(args, steps)
  except subprocess.CalledProcessError as e:
    raise SystemExit(f"command failed ({e.returncode}): {shlex.join(e.cmd)}")


if __name__ == "__main__":
  main(sys.argv[1:])
