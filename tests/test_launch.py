"""The Cloud TPU launcher's dry run: the gcloud commands a multi-host slice gets."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(*args):
  proc = subprocess.run([sys.executable, "launch/tpu_vm.py", "--dry_run", *args], cwd=ROOT,
                        capture_output=True, text=True, check=True)
  return [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]


def test_multi_host_slice_all_steps():
  cmds = dry_run("all", "--name=l3", "--zone=us-east5-b", "--project=p1",
                 "--accelerator_type=v5litepod-16", "--workdir=gs://b/runs/l3", "--delete_after",
                 "--", "--gin_file=experiments/llama3_1b/pretrain.gin", "--gin.MeshConfig.fsdp=-1")
  assert cmds[0] == ("gcloud compute tpus tpu-vm create l3 --zone=us-east5-b --project=p1 "
                     "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite")
  assert cmds[1].startswith("git -C . archive --format=tar.gz")
  assert cmds[2].startswith("gcloud compute tpus tpu-vm scp /tmp/l3-llmjax.tar.gz "
                            "l3:/tmp/llmjax.tar.gz --zone=us-east5-b --project=p1 --worker=all")
  assert "--worker=all" in cmds[3] and "pip install -q -e" in cmds[3] and ".[tpu]" in cmds[3]
  run = cmds[4]
  assert run.startswith("gcloud compute tpus tpu-vm ssh l3 --zone=us-east5-b --project=p1 "
                        "--worker=all")
  for part in ("--workdir=gs://b/runs/l3", "--jax_distributed",
               "--gin_file=experiments/llama3_1b/pretrain.gin", "--gin.MeshConfig.fsdp=-1",
               "tee -a ~/llmjax_train.log"):
    assert part in run
  assert cmds[5] == "gcloud compute tpus tpu-vm delete l3 --zone=us-east5-b --project=p1 --quiet"
  assert len(cmds) == 6


def test_queued_resource_and_spot():
  cmds = dry_run("create", "--name=big", "--zone=us-central2-b", "--accelerator_type=v4-64",
                 "--queued", "--spot")
  assert cmds == [
      "gcloud compute tpus queued-resources create big-qr --node-id=big --zone=us-central2-b "
      "--accelerator-type=v4-64 --runtime-version=tpu-ubuntu2204-base --spot",
      "gcloud compute tpus queued-resources describe big-qr --zone=us-central2-b "
      "'--format=value(state.state)'"]


def test_unknown_generation_asks_for_runtime_version():
  proc = subprocess.run([sys.executable, "launch/tpu_vm.py", "create", "--name=x", "--zone=z",
                         "--accelerator_type=v9-8", "--dry_run"], cwd=ROOT, capture_output=True,
                        text=True)
  assert proc.returncode != 0 and "--runtime_version" in proc.stderr
