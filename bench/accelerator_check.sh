#!/usr/bin/env bash
# bench/accelerator_check.py from the repository root, after installing any wheels carried in
# .whl/ (gin-config, grain and grain's needs, for a machine whose Python lacks them; without
# them the check runs its parts over import stubs, see the script's docstring).
#   bash bench/accelerator_check.sh [--smoke] [--out_dir=DIR] [--parts=a,b]
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  # --no-deps: the wheels name each package they need; everything else is the machine's own.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/llmjax_site .whl/*.whl
  export PYTHONPATH="/tmp/llmjax_site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec python3 bench/accelerator_check.py "$@"
