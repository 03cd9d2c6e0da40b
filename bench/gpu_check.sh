#!/usr/bin/env bash
# The GPU checks, as one script for a lent single-GPU machine (docs/benchmarks.md § GPU).
# Needs: PyTorch with CUDA, transformers, pyyaml, numpy, tiktoken; the other Python packages
# (pydantic, deepspeed, webdataset, hjson, ...) as wheels in .whl/; demo shards in runs/demo/data
# (`make demo` makes them). Results go to $OUT (default: runs/gpu-check).
#
#   bash bench/gpu_check.sh
#   CHECKS="switch-layer plan-accuracy" bash bench/gpu_check.sh     # a subset
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
CHECKS=${CHECKS:-gpt3-small-step trainer-gpt3-small trainer-gpt3-small-compiled trainer-tiny-switch switch-layer banded-layer banded-layer-flex plan-accuracy eval-cuda eval-cpu}
step() {  # step NAME TIMEOUT COMMAND...: runs one check, logs it, goes on when it fails
  local name=$1 limit=$2; shift 2
  case " $CHECKS " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc in $((SECONDS - start)) s"
  tail -n 40 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())"

# 1. GPT-3 Small step, ours vs Hugging Face, bf16, SDPA kernels, MFU.
step gpt3-small-step 120 $PY bench/gpu_step.py --json "$OUT/gpt3-small-step.json"
# 2. The trainer itself: DeepSpeed ZeRO-1, NCCL, bf16, GPT-3 Small on the demo shards.
RUNS=$(mktemp -d)
step trainer-gpt3-small 150 $PY -m cluster.cli train configs/train/gpt3-125m.yaml --run-dir "$RUNS/gpt3-125m" \
  --set data.path=runs/demo/data --set train.max_steps=30 --set train.global_batch_size=16 \
  --set train.batch_rampup_tokens=0 --set train.warmup_tokens=100000 --set checkpoint.interval=1000000 \
  --set logging.wandb_mode=disabled --set data.num_workers=4
cp "$RUNS/gpt3-125m/metrics.jsonl" "$OUT/trainer-gpt3-small.metrics.jsonl" 2>/dev/null
# 2b. The same with train.compile (regional torch.compile of each block): the MFU it buys on a GPU.
step trainer-gpt3-small-compiled 240 $PY -m cluster.cli train configs/train/gpt3-125m.yaml \
  --run-dir "$RUNS/gpt3-125m-compiled" --set train.compile=true \
  --set data.path=runs/demo/data --set train.max_steps=30 --set train.global_batch_size=16 \
  --set train.batch_rampup_tokens=0 --set train.warmup_tokens=100000 --set checkpoint.interval=1000000 \
  --set logging.wandb_mode=disabled --set data.num_workers=4
cp "$RUNS/gpt3-125m-compiled/metrics.jsonl" "$OUT/trainer-gpt3-small-compiled.metrics.jsonl" 2>/dev/null
# 3. The tiny Switch through the trainer on the GPU (our MoE layer under DeepSpeed, bf16).
step trainer-tiny-switch 90 $PY -m cluster.cli train configs/train/tiny-switch-cpu.yaml --run-dir "$RUNS/tiny-switch" \
  --set train.max_steps=40 --set train.precision=bf16 --set logging.wandb_mode=disabled
cp "$RUNS/tiny-switch/metrics.jsonl" "$OUT/trainer-tiny-switch.metrics.jsonl" 2>/dev/null
# 4. The Switch layer against DeepSpeed's MoE on the GPU (the CPU benchmark's shapes).
step switch-layer 90 $PY bench/model_step.py --part moe --device cuda --repeats 20
# 4b. GPT-3's banded layer against the dense causal layer (bf16, T 2048, window 256); then again with
#     FlexAttention's sliding window beside the blocked layout (apart, so a failed compile loses nothing).
step banded-layer 90 $PY bench/banded_and_loss.py --part attention --device cuda --repeats 20
step banded-layer-flex 150 $PY bench/banded_and_loss.py --part attention --device cuda --repeats 20 --flex
# 5. The planner's memory estimate against torch.cuda.max_memory_allocated.
step plan-accuracy 90 $PY bench/plan_accuracy.py configs/train/gpt3-125m.yaml configs/train/tiny-switch-cpu.yaml \
  --device cuda --engine deepspeed --json
# 6. `pretrain eval` batched on the GPU, then the same eval on the CPU: the same numbers (needs check 2's run).
for device in cuda cpu; do
  step "eval-$device" 300 $PY -m cluster.cli eval "$RUNS/gpt3-125m" --device $device --batch-size 16 --max-batches 8 \
    --examples 20 --json
done
exit 0
