#!/usr/bin/env bash
# The GPU path measured (issue #16): estimate, recalibrate, sweep-alpha and tune with --device cuda on the
# sample checkpoints and on a ResNet-50-sized random net with a few thousand synthetic images, checked
# against the CPU run; prints images/s and the sweep's speed ratio. Bounded to under 5 minutes.
#
#   scripts/gpu_check.sh                    # on a CUDA machine (one GPU)
#   scripts/gpu_check.sh --device cpu --tiny   # the CPU smoke test of the script itself (seconds)
#   NPROC=2 scripts/gpu_check.sh --dist     # also: estimate/recalibrate under torchrun with NCCL
#
# Exit status: 0 when every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LIMIT=${GPU_CHECK_SECONDS:-280}

DIST=0
ARGS=()
for a in "$@"; do
  if [ "$a" = "--dist" ]; then DIST=1; else ARGS+=("$a"); fi
done

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'GPUs')"
timeout "$LIMIT" "$PY" scripts/gpu_check.py "${ARGS[@]}"

if [ "$DIST" = 1 ]; then
  # NCCL: the CLI under torchrun, one GPU per process (falls back to gloo with --device cpu)
  N=${NPROC:-$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")}
  OUT=$(mktemp -d)
  M=sample_checkpoints/mnist1d_b2/model.pt; D=sample_checkpoints/mnist1d_b2/val.npz
  TORCHRUN=$(dirname "$PY")/torchrun; [ -x "$TORCHRUN" ] || TORCHRUN=torchrun
  for dev in cuda cpu; do
    if [ "$dev" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then continue; fi
    timeout 120 "$TORCHRUN" --nproc-per-node "$N" --master-addr 127.0.0.1 --master-port 29533 -m bncorrect \
      recalibrate $M --data $D --upstream train --batch-size 2 --device $dev -o "$OUT/recal_$dev.safetensors"
    timeout 120 "$TORCHRUN" --nproc-per-node "$N" --master-addr 127.0.0.1 --master-port 29534 -m bncorrect \
      estimate $M --data $D -B 2 --device $dev -o "$OUT/est_$dev.safetensors"
  done
  "$PY" - "$OUT" <<'PYEOF'
import sys, torch
from pathlib import Path
from safetensors.torch import load_file
from bncorrect import api
out = Path(sys.argv[1]); M = "sample_checkpoints/mnist1d_b2/model.pt"; D = "sample_checkpoints/mnist1d_b2/val.npz"
one = api.recalibrate(M, D, upstream="train", batch_size=2, device="cpu").corrections.layers
fails = 0
for f in sorted(out.glob("recal_*.safetensors")):
    got = load_file(str(f))
    worst = max(float(((got[f"{n}.running_var"].double() - c.running_var.double()).abs() / c.running_var.double().abs()).max()) for n, c in one.items())
    ok = worst < 1e-3; fails += not ok
    print(f"  {'PASS' if ok else 'FAIL'} torchrun recalibrate ({f.stem}) vs one CPU process: max rel diff {worst:.2e}")
sys.exit(fails)
PYEOF
fi
