#!/usr/bin/env bash
# The checks only a CUDA GPU can run, in one go (about 10 minutes on an H100/H200):
#   bash benchmarks/gpu_check.sh DATA_DIR [OUT_DIR] [TEXT_FILE]
# DATA_DIR holds GPT-2 tokens written by prepare.py; TEXT_FILE (TinyStories .txt) feeds bench_sample.py's checkpoint.
# Each step has its own time limit and log, so one failure does not hide the others. Prints a summary at the end.
# SKIP="name ..." leaves steps out (and the checks that read their logs). Running it again into the same
# OUT_DIR starts every training run over.
set -u
DATA=$(realpath "${1:?usage: gpu_check.sh DATA_DIR [OUT_DIR] [TEXT_FILE]}")
OUT=$(realpath -m "${2:-out-gpu-check}")
TEXT=${3:+$(realpath "$3")}
cd "$(dirname "$0")/.."  # the repository root: the scripts are run from there
TEXT=${TEXT:-$(realpath ../shared/tinystories-sample/valid.txt)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
summary=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, remember the exit status
  local name=$1 limit=$2; shift 2
  rm -f "$OUT/$name.log"  # a log from an earlier run never stands in for this one
  case " ${SKIP:-} " in *" $name "*) echo "=== $name: skipped"; return;; esac
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 25
  local rc=${PIPESTATUS[0]}
  summary+=("$name rc=$rc $((SECONDS - t0))s")
}
check() {  # check NAME AFTER COMMAND...: a step that reads step AFTER's log; skipped when AFTER did not run
  local name=$1 after=$2; shift 2
  if [ ! -f "$OUT/$after.log" ]; then rm -f "$OUT/$name.log"; echo "=== $name: skipped ($after did not run)"; return; fi
  step "$name" 5 "$@"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no CUDA GPU here"; exit 1; }
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"

# The default recipe (8x512, bf16, torch.compile, fused AdamW): tokens/s and MFU once compiled
step train_default 240 $PY train.py --data_dir="$DATA" --out_dir="$OUT/default" --overwrite=True --max_iters=300 \
  --eval_interval=300 --eval_tokens=655360 --log_interval=20 --warmup_iters=100 --plot=True
# AdamW against Muon at equal steps on the default recipe, before the sample overfits (item 4 of the quality issue):
# val loss of each; tokens/s = 300 x 131,072 / train s
step quality_adamw_muon 300 $PY benchmarks/bench_quality.py --recipe= --steps=300 --out_root="$OUT/quality" \
  --flags="--data_dir=$DATA --eval_interval=300 --eval_tokens=655360 --log_interval=50 --warmup_iters=100 --plot=False"
# The same without torch.compile, and fp16 with its GradScaler
step train_eager 90 $PY train.py --data_dir="$DATA" --out_dir="$OUT/eager" --overwrite=True --compile=False \
  --max_iters=60 --eval_interval=60 --eval_tokens=163840 --log_interval=20 --plot=False
# A half-minute budget: it stops on the clock, at the end of a decay to min_lr, then evaluates and saves
step train_budget 90 $PY train.py --data_dir="$DATA" --out_dir="$OUT/budget" --overwrite=True --compile=False \
  --max_minutes=0.5 --lr_schedule=wsd --eval_interval=100000 --eval_tokens=163840 --log_interval=20 --plot=False
step train_fp16 90 $PY train.py --data_dir="$DATA" --out_dir="$OUT/fp16" --overwrite=True --compile=False \
  --dtype=float16 --max_iters=40 --eval_interval=20 --eval_tokens=163840 --log_interval=20 --plot=False
# Resume the fp16 run for 20 more steps; then NCCL under torchrun (one process)
step resume_fp16 90 $PY train.py --data_dir="$DATA" --out_dir="$OUT/fp16" --compile=False --dtype=float16 \
  --init_from=resume --max_iters=60 --eval_interval=20 --eval_tokens=163840 --log_interval=20 --plot=False
check resumed_at_40 resume_fp16 grep "resuming from .* at iter 40" "$OUT/resume_fp16.log"  # not afresh
step torchrun_nccl 120 torchrun --standalone --nproc_per_node=1 train.py --data_dir="$DATA" --out_dir="$OUT/ddp" \
  --overwrite=True --compile=False --max_iters=20 --eval_interval=20 --eval_tokens=163840 --log_interval=10 --plot=False
# Sampling from a checkpoint (the compiled run's; CKPT=dir for another), on the GPU and loaded across to the CPU
CKPT=${CKPT:-$OUT/default}
step sample_cuda 60 $PY sample.py --out_dir="$CKPT" --prompt="Once upon a time" --num_samples=2 \
  --max_new_tokens=100 --seed=1
step sample_cpu 60 $PY sample.py --out_dir="$CKPT" --prompt="Once upon a time" --num_samples=1 \
  --max_new_tokens=60 --device=cpu --seed=1
step sample_compile 120 env TORCH_LOGS=graph_breaks $PY sample.py --out_dir="$CKPT" --prompt="Once upon a time" \
  --num_samples=2 --max_new_tokens=100 --seed=1 --compile=True
# a graph break or the recompile limit falls back to eager and still exits 0: the log must show neither
check compiled_whole sample_compile bash -c \
  "! grep -E 'Graph break|recompile_limit|cache_size_limit' '$OUT/sample_compile.log'"
# Greedy with and without the KV cache, past block_size, in fp32 and bf16
step greedy_cuda 120 $PY benchmarks/greedy_check.py --out_dir="$CKPT" --device=cuda --dtypes=float32,bfloat16 \
  --max_new_tokens=1200
# Generation speed at the default GPU config, fp32 and bf16 weights
step bench_sample 240 $PY benchmarks/bench_sample.py --configs=gpu --device=cuda --runs=1 --dtype=float32 \
  --text="$TEXT"
step bench_sample_bf16 120 $PY benchmarks/bench_sample.py --configs=gpu --device=cuda --runs=1 --dtype=bfloat16 \
  --methods=cache --text="$TEXT"

grep -h "^eval\|^model\|^device" "$OUT"/*.log
printf '%s\n' "${summary[@]}"
failed=$(printf '%s\n' "${summary[@]}" | grep -vc " rc=0 ")
exit $((failed > 0))
