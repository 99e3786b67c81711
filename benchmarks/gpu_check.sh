#!/usr/bin/env bash
# The GPU throughput check, one command (BENCHMARKS.md, "GPU check"):
#
#   bash benchmarks/gpu_check.sh [--out DIR]      # on a machine with an NVIDIA GPU
#   bash benchmarks/gpu_check.sh --dry_run        # the same steps at tiny sizes on the CPU
#
# 1. installs the CUDA build of the jax version this environment pins (jax[cuda12]==<version>;
#    skipped with --dry_run or when jax already sees a GPU);
# 2. runs the round-throughput benchmark: W1 at cohorts 50 and 500, W2 (bf16) at 16 and 256
#    clients, W3 (bf16, the 100M decoder) at 64 clients, each with the engine's strategies and
#    the per-client loops (jax_client_loop, torch_loop; drjax where installed);
# 3. writes DIR/gpu_check.json (every record) and DIR/gpu_check.md (one table).
#
# Budget: 8 minutes of GPU time in all; every benchmark command has its own timeout (the sum
# is 450 s), and a command that runs out leaves the others' rows intact.
set -u -o pipefail

DRY_RUN=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry_run) DRY_RUN=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "error: unknown argument $1; use --dry_run and/or --out DIR" >&2; exit 1 ;;
  esac
  shift
done
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"

if [ "$DRY_RUN" = 0 ]; then
  if ! "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
    JAX_VERSION="$("$PY" -c 'import jax; print(jax.__version__)')" || {
      echo "error: jax is not installed; pip install -e . first" >&2; exit 1; }
    echo "installing jax[cuda12]==$JAX_VERSION" >&2
    "$PY" -m pip install -q "jax[cuda12]==$JAX_VERSION" || {
      echo "error: pip could not install jax[cuda12]==$JAX_VERSION" >&2; exit 1; }
  fi
  "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" || {
    echo "error: jax sees no GPU after installing jax[cuda12]; check the NVIDIA driver (nvidia-smi)" >&2
    exit 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || true
fi

DRJAX=""
"$PY" -c "import drjax" 2>/dev/null && DRJAX=",drjax"

# name | timeout s | arguments
if [ "$DRY_RUN" = 1 ]; then
  SIZES_W1_A="--quick --cohort 4"; SIZES_W1_B="--quick --cohort 8"
  SIZES_W2_A="--quick --clients 2"; SIZES_W2_B="--quick --clients 4"
  SIZES_W3="--quick --clients 4"; ROUNDS="--rounds 1"; DT=""
  LIMIT_SCALE=10  # a shared 2-core CPU compiles and runs far slower than the GPU
else
  SIZES_W1_A="--cohort 50"; SIZES_W1_B="--cohort 500"
  SIZES_W2_A="--clients 16"; SIZES_W2_B="--clients 256"
  SIZES_W3="--clients 64"; ROUNDS="--rounds 3"; DT="--dtype bfloat16"
  LIMIT_SCALE=1
fi
RUNS=(
  "w1_cohort_a|60|--workload w1 $SIZES_W1_A $ROUNDS --runners fedjax_fm[default],fedjax_fm[vmap],fedjax_fm[chunked25,scan],jax_client_loop,torch_loop$DRJAX"
  "w1_cohort_b|120|--workload w1 $SIZES_W1_B $ROUNDS --runners fedjax_fm[default],fedjax_fm[chunked100,scan],jax_client_loop,torch_loop$DRJAX"
  "w2_clients_a|60|--workload w2 $SIZES_W2_A $ROUNDS $DT --runners fedjax_fm[default],fedjax_fm[vmap],jax_client_loop,torch_loop$DRJAX"
  "w2_clients_b|90|--workload w2 $SIZES_W2_B $ROUNDS $DT --runners fedjax_fm[default],fedjax_fm[chunked64,scan],jax_client_loop,torch_loop"
  "w3_clients|120|--workload w3 $SIZES_W3 $ROUNDS $DT --runners fedjax_fm[default],fedjax_fm[chunked16,scan],fedjax_fm[sequential8,scan],jax_client_loop,torch_loop"
)

STATUS=0
for run in "${RUNS[@]}"; do
  IFS="|" read -r name limit args <<< "$run"
  limit=$((limit * LIMIT_SCALE))
  echo "== $name: round_throughput.py $args (timeout ${limit}s)" >&2
  # shellcheck disable=SC2086  # $args is a list of flags
  timeout "$limit" "$PY" "$HERE/round_throughput.py" $args --json "$OUT/$name.json" \
      > "$OUT/$name.md" 2> "$OUT/$name.log"
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "   $name ended with status $rc (124: out of time); see $OUT/$name.log" >&2
    STATUS=1
  fi
done

"$PY" - "$OUT" <<'EOF'
import glob, json, os, sys

out = sys.argv[1]
records = []
for path in sorted(glob.glob(os.path.join(out, "w*.json"))):
  run = os.path.basename(path)[:-5]
  for r in json.load(open(path)):
    r["run"] = run
    records.append(r)
json.dump(records, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
gpu = open(os.path.join(out, "gpu.txt")).read().strip() if os.path.exists(
    os.path.join(out, "gpu.txt")) else "none (dry run)"
lines = [f"GPU: {gpu}", "",
         "| run | workload | runner | s/round | vs default | vs torch_loop | tokens/s | % of peak "
         "| warm-up s | rel. diff |", "|---|---|---|---|---|---|---|---|---|---|"]
for run in dict.fromkeys(r["run"] for r in records):
  rows = [r for r in records if r["run"] == run]
  ref = next((r["s_per_round"] for r in rows if r["default"]), None)
  torch_s = next((r["s_per_round"] for r in rows if r["runner"] == "torch_loop"), None)
  for r in rows:
    s = r["s_per_round"]
    diff = r.get("rel_diff_vs_first")
    tok = r.get("tokens_per_s")
    lines.append(
        f"| {run} | {r['summary'].split(':')[0]} | {r['runner']}{' *' if r['default'] else ''} "
        f"| {s:.3f} | {f'{ref / s:.2f}x' if ref else 'n/a'} "
        f"| {f'{torch_s / s:.1f}x' if torch_s else 'n/a'} | {f'{tok:.0f}' if tok else ''} "
        f"| {100 * r['peak_fraction']:.0f}% | {r['warmup_s']:.1f} "
        f"| {'' if diff is None else f'{diff:.1e}'} |")
lines.append("")
lines.append("* = default_execution(); % of peak: of the measured matmul peak in the run's dtype "
             "(bf16 on the GPU, W2 and W3). Per-run headers (sizes, peak) are in <run>.md.")
open(os.path.join(out, "gpu_check.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"wrote {out}/gpu_check.json and {out}/gpu_check.md", file=sys.stderr)
EOF
exit $STATUS
