#!/usr/bin/env bash
# make gpu-check: prove the GPU path on a CUDA machine in one call, offline, in under 8 minutes.
#   Here (network):   make gpu-wheels             -> .whl/ (the packages that machine lacks)
#   There:            make gpu-check              -> logs and results JSON in $OUT (or benchmarks/results/gpu-check)
# It uses the machine's own python3 and torch, installs .whl/ with --no-index, then runs
#   1. pytest -m gpu: QLoRA mechanics on a small random Llama (loss falls, base unchanged, adapter
#      reloads, resume after kill, FSDP-QLoRA as one process and as two with two GPUs);
#   2. the bench, ftlab vs TRL's SFTTrainer (and ftlab without its own fusions), QLoRA on
#      Llama-3.1-8B's shapes (random weights built on the GPU) at sequence 2048, batch 4: tokens/s,
#      MFU (over all steps and steady-state), peak GPU memory;
#   3. a profile of ftlab's training step: GPU time by kind of kernel, and how busy the GPU was;
#   4. the decoding engine (scripts/bench_engine.py): 64 concurrent requests over the 8B shapes with 4
#      adapters and base rows in one batch, output tokens/s against one client;
#   5. reinforcement fine-tuning (scripts/bench_rft.py): ftlab against TRL's GRPOTrainer, QLoRA on the 8B
#      shapes, 4 steps of 2 prompts x 8 samples: seconds a step, peak memory;
#   6. preference fine-tuning (scripts/bench_dpo.py): ftlab against TRL's DPOTrainer, QLoRA on the 8B shapes,
#      4 steps of 4 pairs: pairs a second, peak memory;
#   7. if time is left, ftlab with train.liger_kernel=true and with train.compile=true.
# Each part runs under its own time limit and a failing part does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu-check}
SITE=${FTLAB_GPU_SITE:-/tmp/ftlab-site}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
STEPS=${GPU_CHECK_STEPS:-10}
started=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - started) )); }
mkdir -p "$OUT"
stamp=$(date +%Y-%m-%d)

"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
  || { echo "gpu-check: installing .whl/ failed (run make gpu-wheels where PyPI is reachable)"; exit 2; }
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
CACHE=${GPU_CHECK_CACHE:-/tmp/ftlab-cache}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" -c "import torch, transformers, peft, bitsandbytes, trl; print('torch', torch.__version__, 'cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0), '| transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'trl', trl.__version__)"
} 2>&1 | tee "$OUT/environment.txt"

status=0
echo "== pytest -m gpu ($(left) s left)"
timeout 200 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --durations=0 tests/test_gpu.py 2>&1 | tee "$OUT/pytest-gpu.log" \
  || status=1

SHAPES=(--device cuda --train qlora --quantization nf4 --precision bf16 --backbone llama-3.1-8b-random --fill-length
        --max-length 2048 --batch-size 4 --cache-dir "$CACHE")
bench() {  # bench <runners> <results name>
  timeout "$(left)" "$PYTHON" scripts/bench.py "${SHAPES[@]}" --steps "$STEPS" --repeats 1 --no-whole-process \
    --runners "$1" --out "$OUT/$2" 2>&1 | tee "$OUT/${2%.json}.log"
}
echo "== bench: ftlab vs TRL, QLoRA, Llama-3.1-8B shapes ($(left) s left)"
bench ftlab,trl-defaults,ftlab-unfused "gpu-llama8b-qlora-$stamp.json" || status=1
if [ "$(left)" -gt 100 ]; then
  echo "== profile of ftlab's step ($(left) s left)"
  timeout "$(left)" "$PYTHON" scripts/profile_step.py "${SHAPES[@]}" --warmup 3 --steps 2 \
    --out "$OUT/gpu-llama8b-qlora-profile-$stamp.json" 2>&1 | tee "$OUT/gpu-llama8b-qlora-profile-$stamp.log" || status=1
fi
if [ "$(left)" -gt 90 ]; then
  echo "== decoding engine: Llama-3.1-8B shapes, bf16, base + 4 adapters, 1 and 64 clients ($(left) s left)"
  timeout "$(( $(left) - 30 ))" "$PYTHON" scripts/bench_engine.py --device cuda --precision bf16 \
    --backbone llama-3.1-8b-random --adapters 4 --clients 1,64 --requests 2 --prompt-tokens 256 --max-tokens 128 \
    --max-batch-size 64 --cache-dir "$CACHE" --json "$OUT/gpu-llama8b-engine-$stamp.json" 2>&1 \
    | tee "$OUT/gpu-llama8b-engine-$stamp.log" || status=1
fi
if [ "$(left)" -gt 120 ]; then
  echo "== reinforcement fine-tuning: ftlab vs TRL's GRPOTrainer, Llama-3.1-8B shapes, QLoRA ($(left) s left)"
  timeout "$(( $(left) - 30 ))" "$PYTHON" scripts/bench_rft.py --device cuda --precision bf16 \
    --backbone llama-3.1-8b-random --steps 4 --cache-dir "$CACHE" --out "$OUT/gpu-llama8b-rft-$stamp.json" 2>&1 \
    | tee "$OUT/gpu-llama8b-rft-$stamp.log" || status=1
fi
if [ "$(left)" -gt 120 ]; then
  echo "== preference fine-tuning: ftlab vs TRL's DPOTrainer, Llama-3.1-8B shapes, QLoRA ($(left) s left)"
  timeout "$(( $(left) - 30 ))" "$PYTHON" scripts/bench_dpo.py --device cuda --precision bf16 \
    --backbone llama-3.1-8b-random --steps 4 --runners ftlab,trl --cache-dir "$CACHE" \
    --out "$OUT/gpu-llama8b-dpo-$stamp.json" 2>&1 \
    | tee "$OUT/gpu-llama8b-dpo-$stamp.log" || status=1
fi
for option in liger compiled; do  # each in its own run, so a compile that runs out of time costs only itself
  if [ "$(left)" -gt 100 ]; then
    echo "== bench: ftlab-$option ($(left) s left)"
    bench "ftlab-$option" "gpu-llama8b-qlora-$option-$stamp.json" || status=1
  else
    echo "== skipped ftlab-$option: $(left) s left"
  fi
done
echo "gpu-check finished in $(( $(date +%s) - started )) s, status $status; results in $OUT"
exit $status
