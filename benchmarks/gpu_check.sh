#!/bin/bash
# The GPU checks of docs/PERFORMANCE.md ("On a GPU"), in one run of about 10 minutes on one H100 or H200:
#
#     bash benchmarks/gpu_check.sh OUT_DIR          # from the repository root, with .venv built from lock-cuda.txt
#
# 1. what the machine is (`tunesmith env --json`);
# 2. SFT, LoRA and full fine-tuning, on a ~0.5B Llama-architecture config (Qwen2.5-0.5B's blocks: width 896,
#    24 layers, 14 query and 2 key/value heads, MLP 4,864; vocabulary 32,768) at rows of 2,048 tokens in bf16,
#    through tunesmith's training code (scaling_bench: fused loss, attention per sequence): model FLOP/s, the
#    share of the matmul ceiling measured on the same GPU, and MFU, the share of the GPU's dense bf16 peak
#    (tunesmith.train.estimate.speed.GPU_PEAK_BF16; target: at least 40%);
# 3. the same model side by side with TRL's SFTTrainer (sft_bench: LoRA, full and QLoRA on bitsandbytes' CUDA
#    kernels, padding-free next to TRL's padding_free, and tunesmith's padded batches next to its padding-free ones);
# 4. DeepSpeed ZeRO-2 and ZeRO-3 (configs/deepspeed/), actually executed: `tunesmith train` with
#    train.distributed.strategy=deepspeed for a few steps in one process, the losses next to the same run without
#    DeepSpeed. DeepSpeed is not in the lock: install its wheel first (the machine may have no network:
#    `pip download deepspeed==0.18.* --no-deps -d wheels/` where there is one, then carry wheels/ over and
#    `.venv/bin/pip install --no-deps wheels/deepspeed-*`); without it the step says so and the others run.
#
# Every result goes to OUT_DIR (markdown tables and JSON); the summary is printed at the end.
set -u
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
PY=.venv/bin/python
SHAPE="--hidden-size 896 --layers 24 --heads 14 --intermediate-size 4864"
MFU_ARGS="--device cuda --dtype bf16 --sweeps seq --seq-lens 2048 --vocab 32768 $SHAPE --kv-heads 2 --paths fused \
--tokens 16384 --steps 6 --warmup 2 --strategies full lora"
TRL_ARGS="--device cuda --dtype bf16 $SHAPE --vocab-size 32768 --repeats 1 --conversations 64 --batch 8 --steps 8 \
--warmup 2 --cases tunesmith-lora tunesmith-lora-padded trl-lora-best tunesmith-full trl-full-best tunesmith-qlora \
trl-qlora-best"
say() { echo "== $*" | tee -a "$OUT/summary.md"; }

say "machine"
.venv/bin/tunesmith env --json > "$OUT/env.json" 2>&1 || true
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$OUT/summary.md"

say "SFT at 2,048 tokens a row, bf16: model FLOP/s, matmul ceiling, MFU"
timeout 240 $PY benchmarks/scaling_bench.py $MFU_ARGS --json "$OUT/mfu.json" > "$OUT/mfu.md" 2> "$OUT/mfu.err" || say "scaling_bench failed: see $OUT/mfu.err"
$PY - "$OUT/mfu.json" <<'EOF' | tee -a "$OUT/summary.md"
import json, sys, torch
from tunesmith.train.estimate.speed import GPU_PEAK_BF16
name = torch.cuda.get_device_name()
peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
try:
    runs = json.load(open(sys.argv[1]))["runs"]["seq"]
except (OSError, ValueError, KeyError):
    sys.exit("no MFU results")
for r in runs:
    mfu = f"{r['model_flops_per_s'] / peak:.1%}" if peak else "peak unknown"
    print(f"{r.get('strategy', '?')}: {r['tokens_per_s']:,.0f} tokens/s, {r['model_flops_per_s'] / 1e12:.1f} model "
          f"TFLOP/s, {r['share_of_ceiling']:.0%} of the matmul ceiling, MFU {mfu} of {name}'s dense bf16 peak")
EOF

say "side by side with TRL (bf16, the 0.5B shape, 64 conversations)"
timeout 300 $PY benchmarks/sft_bench.py $TRL_ARGS --json "$OUT/trl.json" > "$OUT/trl.md" 2> "$OUT/trl.err" || say "sft_bench failed: see $OUT/trl.err"
tail -n 30 "$OUT/trl.md" >> "$OUT/summary.md"

say "DeepSpeed ZeRO-2 and ZeRO-3"
if $PY -c "import deepspeed" 2> /dev/null; then
    timeout 180 $PY benchmarks/deepspeed_check.py "$OUT/deepspeed" 2>&1 | tail -n 20 | tee -a "$OUT/summary.md"
else
    say "deepspeed is not installed: ZeRO-2/3 not run (see the header of this script)"
fi
say "done: $OUT/summary.md"
