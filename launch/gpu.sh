#!/usr/bin/env bash
# Run llmjax-train on this machine's GPU(s) (or CPU if none), with XLA settings that suit GPUs.
#
#   launch/gpu.sh --gin_file=experiments/llama3_1b/pretrain.gin --workdir=/data/runs/l3 ...
#
# Every argument goes to llmjax-train unchanged. Install first with `pip install -e ".[gpu]"`.
set -euo pipefail

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  nvidia-smi -L >&2
  # Let XLA take most of the GPU up front (fewer allocator stalls); leave room for cuDNN.
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
  # Overlap collectives with compute and let XLA pick faster GEMM/fusion paths on GPUs.
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
else
  echo "launch/gpu.sh: no NVIDIA GPU found, running on CPU" >&2
fi

python -c "import jax; print('jax', jax.__version__, 'devices:', jax.devices())" >&2
exec llmjax-train "$@"
