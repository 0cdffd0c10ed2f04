#!/usr/bin/env bash
# Benchmark 1 on a GPU: GRPO, GRPO + KL, FlowRL (official, matching, matching with the log Z head) and ExGRPO, a
# randomly initialised model of Qwen2.5-0.5B's shape in bf16, step time and peak memory (bench_overhead.py); then the
# same with vLLM colocate generation where vLLM is installed.
#
#   bash benchmarks/gpu_overhead.sh --download   # here, with registry access: the wheels the GPU machine lacks, in .whl/
#   bash benchmarks/gpu_overhead.sh              # there (torch, transformers, accelerate, peft, pandas, pyarrow present)
#
# The GPU machine has no registry access: the wheels travel with the working tree (.whl/, ignored by git). Results go
# to $OUT when it is set (the lent machine's output folder), else to benchmarks/results, as overhead_cuda.json/png.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 math-verify==0.9.0
        latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2)

if [[ "${1:-}" == "--download" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "${WHEELS[@]}"
    exit 0
fi

if [[ -d .whl ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PWD}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/bench_overhead.py --device cuda --model-shape qwen2.5-0.5b --num_threads 8 \
    --steps 10 --warmup 2 --rounds 2 --output-dir "${OUT:-benchmarks/results}"
# The same with vLLM colocate generation, where vLLM is installed (the lent GPU machines have none, and its wheels are
# too large to carry): overhead_cuda_vllm.json/png.
if python3 -c "import vllm" 2>/dev/null; then
    python3 benchmarks/bench_overhead.py --device cuda --model-shape qwen2.5-0.5b --num_threads 8 \
        --steps 10 --warmup 2 --rounds 2 --use_vllm --output-dir "${OUT:-benchmarks/results}"
else
    echo "vLLM is not installed here: the vLLM colocate arm of benchmark 1 is skipped."
fi
