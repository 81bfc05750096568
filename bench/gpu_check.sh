#!/usr/bin/env bash
# GPU check, one command: build the extension, check what backend="auto" runs on the GPU, run the
# Triton tests, measure the target rows.
#
# For a fresh GPU machine with torch (CUDA) and triton preinstalled and no network:
#     bench/gpu_check.sh                 # logs, rows.jsonl and tables under $OUT (default /tmp/mldecoder_gpu_check)
#     OUT=/some/dir bench/gpu_check.sh
# By default it runs the "check" list, in priority order, each stage under its own cap (the caps
# sum to 400 s, so the run ends within about 7 minutes on an H100; a global deadline of
# GPU_CHECK_BUDGET_S seconds, default 400, skips what no longer fits):
#   build (90 s) -> correct_auto_paths (110 s: the CUDA tests of the lean eval forward, the fused
#   training step, dropout-mask redraws and cuda_graphed, against the op-by-op path and the
#   reference) -> triton_tests (90 s) -> target_rows (110 s: COCO and ImageNet-21K, bf16 autocast;
#   eval B = 1 eager and graphed, eval B = 256, training steps B = 256, with peak memory)
# GPU_CHECK_STAGES=more runs the second list (torch.compile peers, profiles, launch counts, the
# training demo, the other configurations, fp32, eval_latency, train_step, e2e: minutes each);
# GPU_CHECK_STAGES=a,b,... runs the named stages of either list, in list order (a stage's name also
# selects its parts: eval_latency selects eval_latency-eager, ...). GPU_CHECK_DRY_RUN=1 prints the
# plan (stage, cap) and runs nothing.
# Every benchmark row is appended to $OUT/rows.jsonl as soon as its case is measured, so a run cut
# short keeps what it measured; $OUT/gpu_check.log is the log, summary.txt the table of results and
# targets. timm for the e2e stage is in the GPU image; where it is not, docs/benchmarks.md
# ("Running it") lists the wheels to bring.
# A failing stage does not stop the later ones; the exit status is non-zero if any stage failed or
# was skipped. Commit the numbers (summary.txt, the tables) with the device, commit and date to
# BENCHMARKS.md: the device machine keeps nothing.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-${TMPDIR:-/tmp}/mldecoder_gpu_check}"
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET_S:-400}
# Smoke-testing this script without a GPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 GPU_CHECK_SKIP_BUILD=1
# (with TRITON_INTERPRET=1 for the Triton rows; slow).
DEVICE=${GPU_CHECK_DEVICE:-cuda}
QUICK=(); [[ -n "${GPU_CHECK_QUICK:-}" ]] && QUICK=(--quick)
T0=$(date +%s)
STATUS=0
SUMMARY=()
PY=${PYTHON:-python}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # works even if the editable install fails
export PYTHONUNBUFFERED=1

log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/gpu_check.log"; }

LIST=check   # the list the stages below belong to: "check" (the default run), then "more"
selected() {  # is stage $1 (or the stage it is a part of, "group-part") selected by GPU_CHECK_STAGES?
  local s wanted; IFS=, read -ra wanted <<< "${GPU_CHECK_STAGES:-check}"
  for s in "${wanted[@]}"; do [[ "$1" == "$s" || "$1" == "$s"-* || "$LIST" == "$s" ]] && return 0; done
  return 1
}
# A stage "group-part" also spends from its group's budget GROUP_CAP[group] (seconds), if set.
declare -A GROUP_CAP=() GROUP_USED=()

# stage NAME CAP_SECONDS [OK_CODES] -- command...
stage() {
  local name=$1 cap=$2 ok=$3; shift 4
  selected "$name" || return 0
  local left=$(( T0 + BUDGET - $(date +%s) ))
  local lim=$(( cap < left ? cap : left ))
  local group=${name%%-*}
  if [[ -n "${GROUP_CAP[$group]:-}" ]]; then
    local group_left=$(( GROUP_CAP[$group] - ${GROUP_USED[$group]:-0} ))
    (( group_left < lim )) && lim=$group_left left=$group_left
  fi
  if [[ -n "${GPU_CHECK_DRY_RUN:-}" ]]; then
    log "PLAN  $name $cap"; return 0
  fi
  if (( lim < 20 )); then
    log "SKIP  $name: only ${left}s of the ${BUDGET}s budget (or of its group's) left"
    SUMMARY+=("$(printf '%-22s skipped (time budget)' "$name")"); STATUS=1; return 1
  fi
  log "START $name (limit ${lim}s): $*"
  local s=$(date +%s)
  timeout --signal=INT --kill-after=20 "$lim" "$@" > "$OUT/$name.log" 2>&1
  local rc=$? dt=$(( $(date +%s) - s ))
  GROUP_USED[$group]=$(( ${GROUP_USED[$group]:-0} + dt ))
  tail -n 15 "$OUT/$name.log" | sed "s/^/    [$name] /"
  if [[ " $ok " == *" $rc "* ]]; then
    log "OK    $name (${dt}s)"; SUMMARY+=("$(printf '%-22s ok      %4ds' "$name" "$dt")")
  else
    local why="exit $rc"; (( rc == 124 || rc == 130 || rc == 137 )) && why="timed out ($rc)"
    log "FAIL  $name: $why after ${dt}s (log: $OUT/$name.log)"
    grep -m 12 -E "^E  |^FAILED|Error:" "$OUT/$name.log" | cut -c1-300 | sed "s/^/    [$name: why] /"
    SUMMARY+=("$(printf '%-22s FAILED  %4ds  %s' "$name" "$dt" "$why")"); STATUS=1
  fi
  return $rc
}

# ---- environment ------------------------------------------------------------------------------
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  if commit=$(git rev-parse HEAD 2>/dev/null); then
    git diff --quiet HEAD -- 2>/dev/null || commit="$commit (with uncommitted changes)"
  else
    commit=unknown
  fi
  echo "commit: $commit"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu,utilization.gpu --format=csv 2>&1 || true
  "$PY" - <<'EOF' 2>&1
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "cc", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton import failed:", e)
EOF
} | tee "$OUT/env.txt"
ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo "9.0")

# ---- 1. build --------------------------------------------------------------------------------
# Only the present GPU's architecture: half the nvcc time of the default "8.0;9.0".
if [[ -n "${GPU_CHECK_SKIP_BUILD:-}" && -z "${GPU_CHECK_DRY_RUN:-}" ]]; then
  selected build && { log "SKIP  build (GPU_CHECK_SKIP_BUILD set)"; SUMMARY+=("$(printf '%-22s skipped (asked)' build)"); }
else
stage build 90 "0" -- env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}" MAX_JOBS="${MAX_JOBS:-16}" \
  "$PY" -m pip install --no-build-isolation --no-deps --no-input -v -e .
fi
"$PY" - <<'EOF' 2>&1 | tee "$OUT/backends.txt"
import json
import mldecoder_fast
print(json.dumps(mldecoder_fast.backends(), indent=1))
EOF

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfEs)
# pytest-xdist, where installed: Triton's compiles of the kernel variants then run in parallel.
if [[ "$DEVICE" == cuda ]] && "$PY" -c "import xdist" 2>/dev/null; then PYTEST+=(-n "${GPU_CHECK_TEST_WORKERS:-8}"); fi

# ---- 2. what auto runs, correct: the CUDA tests (ids containing "cuda") of the module, the lean
# eval forward, the fused training step (dropout on, padded group tail, the 21K shape, fp16 and
# bf16), mask redraws on the CUDA generator, cuda_graphed against eager and graphed training
# replays; not the Triton tests of stage 3 -------------------------------------------------------
stage correct_auto_paths 110 "0 5" -- "${PYTEST[@]}" tests -k cuda -m "not triton" \
  --ignore=tests/test_triton_module.py --junitxml="$OUT/correct_auto_paths.xml"

# ---- 3. Triton tests (kernels and head, bf16/full-size CUDA tests included) -------------------
# The Triton tests carry the "triton" mark (tests/README.md): the op files' Triton cases, the
# kernel infrastructure (without the offline spill compile and the interpreter-only host checks) and
# the module; -k triton matches the mark and the *triton* file names.
# MLDECODER_FAST_AUTOTUNE=0: one (safe) config per kernel, so the tests compile each kernel variant
# once instead of once per config; the benchmark below autotunes and checks agreement per row.
stage triton_tests 90 "0" -- env MLDECODER_FAST_AUTOTUNE=0 "${PYTEST[@]}" tests/ops tests/kernels tests/test_triton_module.py \
  -k triton --ignore=tests/kernels/test_triton_spills.py --ignore=tests/kernels/test_triton_host.py \
  --junitxml="$OUT/triton_tests.xml"

# ---- 4. the target rows (bf16 autocast; docs/benchmarks.md, "GPU targets"): every row checked
# against the float64 reference before it is timed, appended to rows.jsonl as its case finishes ---
BENCH=("$PY" -m mldecoder_fast.cli bench --device "$DEVICE" --no-progress --budget 0.5 "${QUICK[@]}" \
  --jsonl "$OUT/rows.jsonl")
IMPLS=reference,eager-expert,fast-torch,fast-cuda,fast-triton
MAIN_CFGS=coco-tresnet_l-448,imagenet21k-resnet50-224
GROUP_CAP[target_rows]=110
stage target_rows-eval_b1 35 "0" -- "${BENCH[@]}" --dtype bf16 --batch 1 --configs "$MAIN_CFGS" --modes eval \
  --repeats 50 --impls reference,eager-expert,fast-torch,fast-triton,graphed-fast-torch \
  --json "$OUT/bench_target_eval_b1.json" --markdown "$OUT/bench_target_eval_b1.md"
stage target_rows-b256 75 "0" -- "${BENCH[@]}" --dtype bf16 --batch 256 --configs "$MAIN_CFGS" --modes eval,train \
  --impls "$IMPLS" --json "$OUT/bench_target_b256.json" --markdown "$OUT/bench_target_b256.md"

# ======================== the second list: GPU_CHECK_STAGES=more ==============================
LIST=more

# ---- CUDA graph tests again on their own (also in correct_auto_paths) --------------------------
stage test_cuda_graphs 120 "0" -- "${PYTEST[@]}" tests/test_cuda_graphs.py \
  --junitxml="$OUT/test_cuda_graphs.xml"

# ---- benchmark: the headline rows at every batch -----------------------------------------------
stage bench_bf16_coco 120 "0" -- "${BENCH[@]}" --dtype bf16 --batch 1,32,256 --configs coco-tresnet_l-448 \
  --modes eval,train --impls "$IMPLS" --json "$OUT/bench_bf16_coco.json" --markdown "$OUT/bench_bf16_coco.md"
stage bench_bf16_21k 150 "0" -- "${BENCH[@]}" --dtype bf16 --batch 1,32,256 --configs imagenet21k-resnet50-224 \
  --modes eval,train --impls "$IMPLS" --json "$OUT/bench_bf16_21k.json" --markdown "$OUT/bench_bf16_21k.md"

# ---- where the time goes: top kernels per backend (COCO train, B = 256, bf16) -------------
stage profile_coco 60 "0" -- "$PY" bench/profile_backends.py --device "$DEVICE" "${QUICK[@]}" --config coco --mode train \
  --batch 256 --impls eager-expert,fast-torch,fast-triton --top 10 --json "$OUT/profile_coco.json"

# ---- kernel launches per forward of the torch backend: the count made without a GPU (fake
# CUDA tensors; tests/test_launches.py holds its budget) beside the profiler's CUDA kernel count ---
stage launch_counts 60 "0" -- "$PY" bench/launch_counts.py --device "$DEVICE" "${QUICK[@]}" \
  --json "$OUT/launch_counts.json"

# ---- the training demo, reference vs fast head (the fast one gets there faster) ----------------
stage demo 100 "0" -- "$PY" -m mldecoder_fast.cli train multilabel --demo --head both --device "$DEVICE" \
  --workers 4 --no-progress --out "$OUT/demo"

# ---- benchmark: against torch.compile of the reference (tens of seconds per compile) -------
stage bench_bf16_compiled 200 "0" -- "${BENCH[@]}" --dtype bf16 --batch 256 --configs "$MAIN_CFGS" \
  --modes train --impls reference,compiled-reference,fast-torch,fast-triton \
  --json "$OUT/bench_bf16_compiled.json" --markdown "$OUT/bench_bf16_compiled.md"

# ---- benchmark: the other configurations, then fp32 ----------------------------------------
stage bench_bf16_rest 90 "0" -- "${BENCH[@]}" --dtype bf16 --batch 1,32,256 \
  --configs imagenet1k-resnet50-224,openimages-tresnet_m-224,vit-b16-224,zsl-nus-wide-224 \
  --modes eval,train --impls "$IMPLS" --json "$OUT/bench_bf16_rest.json" --markdown "$OUT/bench_bf16_rest.md"
stage bench_fp32 60 "0" -- "${BENCH[@]}" --dtype fp32 --batch 32,256 --configs "$MAIN_CFGS" \
  --modes eval,train --impls "$IMPLS" --json "$OUT/bench_fp32.json" --markdown "$OUT/bench_fp32.md"

# ---- eval latency and training steps (bf16), eager and under CUDA graphs, beside
# torch.compile's peers; where a training step's time goes; a whole ResNet-50 training step --------
# Each stage is a group of parts with its own budget (GROUP_CAP) and each part has its own cap; a
# bench cut short by its cap keeps the cases it finished (SIGINT: it writes its JSON, exit 130).
# Cheap parts first; torch.compile parts (tens of seconds to minutes per case) last. Their JSON is
# eval_latency-*.json, train_step-*.json (not bench_*: its own tables, python -m mldecoder_fast.benchmark.goals, at the end).
GROUP_CAP[eval_latency]=220; GROUP_CAP[train_step]=200; GROUP_CAP[e2e]=90
PEERS=("${BENCH[@]}" --dtype bf16 --configs "$MAIN_CFGS")
EAGER=reference,eager-expert,fast-torch,fast-triton
GRAPHED=graphed-fast-torch,graphed-fast-triton
FAST_RO=compiled-fast-torch-reduce-overhead,compiled-fast-triton-reduce-overhead
stage eval_latency-eager 100 "0" -- "${PEERS[@]}" --modes eval --batch 1,32,256 --repeats 50 \
  --impls "$EAGER,$GRAPHED" --json "$OUT/eval_latency-eager.json"
stage train_step-eager 90 "0" -- "${PEERS[@]}" --modes train --batch 32,256 --repeats 20 \
  --impls "$EAGER,graphed-expert,$GRAPHED" --json "$OUT/train_step-eager.json"
if "$PY" -c "import timm" 2>/dev/null; then
  E2E=(); [[ -n "${GPU_CHECK_QUICK:-}" ]] && E2E=(--model test_resnet --batch 2 --steps 2 --warmup 1 \
    --image-size 64 --classes 50 --decoder-embedding 64)
  stage e2e 90 "0" -- "$PY" bench/e2e_train.py --device "$DEVICE" "${E2E[@]}" --json "$OUT/e2e_train.json"
elif selected e2e; then
  log "SKIP  e2e: 'import timm' failed (bring timm as a wheel: docs/benchmarks.md, Running it)"
  SUMMARY+=("$(printf '%-22s skipped (no timm)' e2e)"); STATUS=1
fi
for cfg in coco imagenet21k; do
  stage "train_step-profile_$cfg" 35 "0" -- "$PY" bench/profile_backends.py --device "$DEVICE" "${QUICK[@]}" \
    --config "$cfg" --mode train --batch 256 --impls "$EAGER" --steps 3 --top 8 --json "$OUT/train_step_profile_$cfg.json"
done
stage eval_latency-vs_reduce_overhead 80 "0" -- "${PEERS[@]}" --configs coco-tresnet_l-448 --modes eval \
  --batch 1,32,256 --repeats 50 --impls "reference,$GRAPHED,compiled-expert-reduce-overhead" \
  --json "$OUT/eval_latency-vs_reduce_overhead.json"
stage eval_latency-vs_max_autotune 120 "0" -- "${PEERS[@]}" --configs coco-tresnet_l-448 --modes eval \
  --batch 1,32,256 --repeats 50 --impls "reference,fast-torch,fast-triton,compiled-expert-max-autotune-no-cudagraphs" \
  --json "$OUT/eval_latency-vs_max_autotune.json"
stage train_step-compiled 120 "0" -- "${PEERS[@]}" --modes train --batch 256 \
  --impls "$EAGER,$GRAPHED,compiled-expert,compiled-expert-reduce-overhead" --json "$OUT/train_step-compiled.json"
stage eval_latency-fast_reduce_overhead 80 "0" -- "${PEERS[@]}" --configs coco-tresnet_l-448 --modes eval \
  --batch 1,256 --repeats 50 --impls "reference,$GRAPHED,$FAST_RO" --json "$OUT/eval_latency-fast_reduce_overhead.json"
stage train_step-fast_reduce_overhead 90 "0" -- "${PEERS[@]}" --modes train --batch 256 \
  --impls "reference,$GRAPHED,$FAST_RO" --json "$OUT/train_step-fast_reduce_overhead.json"

# ---- summary (printed last) -------------------------------------------------------------------
log "stages:"
for line in "${SUMMARY[@]}"; do echo "  $line" | tee -a "$OUT/gpu_check.log"; done
"$PY" - "$OUT" <<'EOF' 2>&1 | tee "$OUT/summary.txt"
import glob, json, os, sys
out = sys.argv[1]
rows, meta = [], None
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    try:
        data = json.load(open(path))
    except Exception as e:  # a stage killed before writing its JSON
        print(f"(unreadable {os.path.basename(path)}: {e})")
        continue
    meta = meta or data.get("meta")
    rows += [r for r in data.get("results", []) if not r.get("skipped")]
if not rows:
    print("no benchmark results")
    sys.exit(0)
cell = {}
for r in rows:
    cell.setdefault((r["config"], r["mode"], r["batch"], r["dtype"]), {})[r["impl"]] = r
impls = ["reference", "compiled-reference", "eager-expert", "fast-torch", "fast-cuda", "fast-triton"]
short = {"reference": "ref", "compiled-reference": "compiled", "eager-expert": "expert",
         "fast-torch": "f-torch", "fast-cuda": "f-cuda", "fast-triton": "f-triton"}
if meta:
    print(f"device {meta.get('device_name')} | torch {meta.get('torch')} | triton {meta.get('triton')} | "
          f"commit {meta.get('commit')} | {meta.get('date')} | matmul {meta.get('matmul_tflops', 0):.0f} TFLOP/s "
          f"({meta.get('dtype')}) | copy {meta.get('copy_gbps', 0):.0f} GB/s")
print("ms (median); x = time of that impl / time of fast-triton; roof = fast-triton roofline fraction")
hdr = f"{'config':<26}{'mode':<6}{'B':>4} {'dtype':<9}" + "".join(f"{short[i]:>9}" for i in impls) + \
      f"{'x ref':>7}{'x comp':>7}{'x torch':>8}{'roof':>6}{'mem/ref':>8} ok"
print(hdr)
summary = []
for key in sorted(cell, key=lambda k: (k[3], k[0], k[1], k[2])):
    c = cell[key]
    ms = {i: c[i]["median_ms"] for i in impls if i in c and c[i].get("median_ms")}
    tri = c.get("fast-triton")
    def ratio(i):
        return ms[i] / ms["fast-triton"] if i in ms and "fast-triton" in ms else None
    mem = None
    if tri and tri.get("peak_bytes") and c.get("reference", {}).get("peak_bytes"):
        mem = tri["peak_bytes"] / c["reference"]["peak_bytes"]
    agree = all(r.get("agree") is not False for r in c.values())
    f = lambda v, w=7, p=2: f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"
    print(f"{key[0][:25]:<26}{key[1]:<6}{key[2]:>4} {key[3]:<9}" + "".join(f(ms.get(i), 9, 2) for i in impls)
          + f(ratio("reference")) + f(ratio("compiled-reference")) + f(ratio("fast-torch"), 8)
          + f(tri.get("roofline") if tri else None, 6) + f(mem, 8) + ("  ok" if agree else "  DISAGREE"))
    summary.append({"config": key[0], "mode": key[1], "batch": key[2], "dtype": key[3], "ms": ms,
                    "x_ref": ratio("reference"), "x_compiled": ratio("compiled-reference"),
                    "x_torch": ratio("fast-torch"), "roofline": tri.get("roofline") if tri else None,
                    "mem_vs_ref": mem, "agree": agree})
# The GPU targets (bf16 autocast; docs/benchmarks.md, "GPU targets"): (what, value, bound), a
# positive bound is a minimum, a negative one a maximum.
def row(config, mode, batch, impl):
    return cell.get((config, mode, batch, "bfloat16"), {}).get(impl)
def ms(config, mode, batch, impl):
    r = row(config, mode, batch, impl)
    return r.get("median_ms") if r else None
def faster(config, mode, batch, slow, fast):
    a, b = ms(config, mode, batch, slow), ms(config, mode, batch, fast)
    return a / b if a and b else None
COCO, IN21K = "coco-tresnet_l-448", "imagenet21k-resnet50-224"
checks = [
    ("COCO eval B=1 graphed-fast-torch ms", ms(COCO, "eval", 1, "graphed-fast-torch"), -0.10),
    ("COCO eval B=1 fast-torch ms", ms(COCO, "eval", 1, "fast-torch"), -0.5),
    ("COCO eval B=1 fast-triton ms", ms(COCO, "eval", 1, "fast-triton"), -0.5),
    ("COCO eval B=256 fast-torch (auto) ms", ms(COCO, "eval", 256, "fast-torch"), -1.0),
    ("21K eval B=256 fast-torch (auto) ms", ms(IN21K, "eval", 256, "fast-torch"), -0.7),
    ("COCO train B=256 fast-torch (auto) ms", ms(COCO, "train", 256, "fast-torch"), -3.5),
    ("21K train B=256 fast-torch (auto) ms", ms(IN21K, "train", 256, "fast-torch"), -2.5),
    ("COCO train B=256 fast-triton vs fast-torch", faster(COCO, "train", 256, "fast-torch", "fast-triton"), 1.15),
    ("21K train B=256 fast-triton vs fast-torch", faster(IN21K, "train", 256, "fast-torch", "fast-triton"), 1.15),
]
r21, ref21 = row(IN21K, "train", 256, "fast-torch"), row(IN21K, "train", 256, "reference")
if r21 and ref21 and r21.get("peak_bytes") and ref21.get("peak_bytes"):
    checks.append(("21K train B=256 peak memory / reference", r21["peak_bytes"] / ref21["peak_bytes"], -0.5))
ok = lambda v, want: v is not None and (v >= want if want > 0 else v <= -want)
print(f"\nGPU targets met: {sum(1 for _, v, want in checks if ok(v, want))}/{len(checks)}")
for what, v, want in checks:
    state = "n/a " if v is None else ("met " if ok(v, want) else "MISS")
    print(f"  {state} {what:<46} {'' if v is None else f'{v:.3f}':>8}  ({'>=' if want > 0 else '<='} {abs(want)})")
json.dump({"meta": meta, "rows": summary}, open(os.path.join(out, "summary.json"), "w"), indent=1)
EOF
if compgen -G "$OUT/eval_latency-*.json" > /dev/null || compgen -G "$OUT/train_step-*.json" > /dev/null \
    || [[ -f "$OUT/e2e_train.json" ]]; then
  echo
  { "$PY" -m mldecoder_fast.benchmark.goals "$OUT"
    if [[ -f "$OUT/e2e_train.json" ]]; then
      echo; "$PY" -c "import json, sys; sys.path.insert(0, 'bench'); from e2e_train import format_table; print(format_table(json.load(open(sys.argv[1]))))" "$OUT/e2e_train.json"
    fi; } 2>&1 | tee "$OUT/targets.txt"
fi
log "done in $(( $(date +%s) - T0 ))s, exit status $STATUS; logs and JSON in $OUT"
# GPU_CHECK_PACK=DIR: everything above as one DIR/gpu_check.tgz (+ summary.txt and the log), for
# transports that bring back only a few files.
if [[ -n "${GPU_CHECK_PACK:-}" ]]; then
  mkdir -p "$GPU_CHECK_PACK"
  # (no checkpoints or example images: the demo's best.pth files alone are tens of MB)
  tar czf "$GPU_CHECK_PACK/gpu_check.tgz" --exclude='*.pth' --exclude='examples' -C "$OUT" . && cp "$OUT/summary.txt" "$OUT/gpu_check.log" "$GPU_CHECK_PACK/" \
    && { [[ ! -f "$OUT/targets.txt" ]] || cp "$OUT/targets.txt" "$GPU_CHECK_PACK/"; }
fi
exit $STATUS
