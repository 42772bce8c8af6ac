#!/usr/bin/env bash
# One prepared check for a CUDA machine that already has torch (and the other dependencies)
# installed and no network: install the project without touching dependencies, record what the
# machine can do, run the CUDA tests and every non-slow test (no xdist: one process, one GPU),
# run the embedded main job on the GPU, the GPU extraction benchmark (ResNet-50 on 8,000 JPEGs generated
# there, against the model's bf16 rate and the hand-written torchvision loaders on the same folder),
# and print a summary. Budget: 10 minutes.
#
#   bash scripts/gpu-check.sh            # on the GPU machine, from the repository root or anywhere
#   bash scripts/gpu-check.sh --dry-run  # anywhere: the same steps without a GPU (collect tests only, 1-epoch CPU job)
#
# Exit code: 0 when every step passed, 1 otherwise. Logs in $GPU_CHECK_DIR (default: a temp dir).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${GPU_CHECK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}
mkdir -p "$OUT"
export ZOO_CACHE_DIR="$OUT/cache" HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
T0=$SECONDS
status=0
step() { echo "== $* ($((SECONDS - T0))s)"; }

if compgen -G ".whl/*.whl" >/dev/null; then  # wheels carried by scripts/gpu-wheels.sh (packages that machine lacks)
    step "carried wheels (.whl/, no network)"
    "$PY" -m pip install -q --no-deps --no-index .whl/*.whl >"$OUT/wheels.log" 2>&1 || { echo "wheels FAILED: $(tail -n 3 "$OUT/wheels.log")"; status=1; }
fi

step "install (no deps, no build isolation, no network)"
if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1; then
    echo "install FAILED: $(tail -n 3 "$OUT/install.log")"; status=1
fi
"$PY" -m pip check >"$OUT/pip-check.log" 2>&1 || true  # declared dependencies this machine lacks

step "zoo doctor"
"$PY" -m zoo.cli.main doctor >"$OUT/doctor.txt" 2>&1 || status=1
cat "$OUT/doctor.txt"

if [[ $DRY -eq 0 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA GPU visible: run with --dry-run off a GPU machine"; exit 1
fi

step "pytest -m 'cuda or not slow' (no xdist)"
pytest_args=(-m "cuda or not slow" -p no:xdist -q -p no:cacheprovider --timeout 240)
[[ $DRY -eq 1 ]] && pytest_args+=(--collect-only)
timeout 270 "$PY" -m pytest "${pytest_args[@]}" >"$OUT/pytest.log" 2>&1
prc=$?
[[ $prc -eq 0 ]] || status=1
tail -n 25 "$OUT/pytest.log"

step "embedded main job on $([[ $DRY -eq 1 ]] && echo cpu || echo cuda)"
job=(train --out "$OUT/run" --json --no-progress)
if [[ $DRY -eq 1 ]]; then job+=(--device cpu --epochs 1); else job+=(--device cuda); fi
timeout "$([[ $DRY -eq 1 ]] && echo 600 || echo 150)" "$PY" -m zoo.cli.main "${job[@]}" >"$OUT/train.json" 2>"$OUT/train.log"
trc=$?
[[ $trc -eq 0 ]] || { status=1; tail -n 5 "$OUT/train.log"; }

step "benchmarks/bench_gpu_extraction.py$([[ $DRY -eq 1 ]] && echo ' --dry-run')"
bench=(benchmarks/bench_gpu_extraction.py)
[[ $DRY -eq 1 ]] && bench+=(--dry-run)
# 330 s on the GPU (8,000 images); a CPU dry run on 2 loaded cores needs up to ~10 minutes
timeout "$([[ $DRY -eq 1 ]] && echo 600 || echo 330)" "$PY" "${bench[@]}" >"$OUT/bench_gpu_extraction.txt" 2>"$OUT/bench_gpu_extraction.log"
brc=$?
[[ $brc -eq 124 ]] && echo "bench_gpu_extraction.py: stopped at its time limit"
[[ $brc -eq 0 ]] || { status=1; tail -n 5 "$OUT/bench_gpu_extraction.log"; }
cat "$OUT/bench_gpu_extraction.txt"

step "summary"
"$PY" - "$OUT" "$prc" "$trc" "$DRY" <<'PYEOF'
import json, re, sys
from pathlib import Path

out, prc, trc, dry = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
doctor = (out / "doctor.txt").read_text().splitlines() if (out / "doctor.txt").exists() else []
pick = lambda key: next((l[len(key):].strip() for l in doctor if l.startswith(key)), "?")
log = (out / "pytest.log").read_text() if (out / "pytest.log").exists() else ""
summary = next((l.strip("= ") for l in reversed(log.splitlines()) if re.search(r"\b(passed|failed|error|collected|no tests)\b", l)), f"pytest exit {prc}")
print(f"machine     {pick('cuda')} | {pick('cpu')}")
print(f"versions    {pick('packages')}")
print(f"exporters   {pick('exporter')}")
print(f"pip check   {(out / 'pip-check.log').read_text().strip().splitlines()[:3] if (out / 'pip-check.log').exists() else '?'}")
print(f"pytest      {summary}  (exit {prc}{', dry run: collected only' if dry else ''})")
try:
    job = json.loads((out / "train.json").read_text().strip().splitlines()[-1])
    print(f"main job    val top-1 {100 * job['val_top1']:.1f}% in {job.get('seconds')}s on {job.get('device')} (exit {trc})")
except Exception as exc:
    print(f"main job    FAILED (exit {trc}): {exc}")
PYEOF
echo "gpu-check: $([[ $status -eq 0 ]] && echo PASSED || echo FAILED) in $((SECONDS - T0))s; logs in $OUT"
exit $status
