#!/usr/bin/env bash
# `distill bench` at the reference shape (recipes/bench-reference.yaml) on one GPU (H100 / H200): chunked vs naive
# loss path, tokens/s, MFU (measured and spec peak), peak memory, the floor. Prints the table and
# writes $OUT/bench.json (+ bench.txt). Run from anywhere; nothing is downloaded.
#
#   OUT=/tmp/out scripts/gpu_bench.sh                 # the reference shape, both paths
#   STEPS=5 WARMUP=1 scripts/gpu_bench.sh             # quicker
#   ALL_KINDS=1 scripts/gpu_bench.sh                  # also every loss kind, chunked path only
#   scripts/gpu_bench.sh stages.distilled.objective.chunk_size=2048   # extra recipe overrides
#
# Needs torch with CUDA, transformers, accelerate, pydantic and pyyaml. If pydantic (or pyyaml) is
# missing, wheels in .whl/ are installed with --no-deps into a temporary directory first; make them
# on a machine with network access, for the GPU machine's Python (3.12 there):
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl pydantic pydantic-core annotated-types typing-inspection typing-extensions pyyaml
# Expected run time: about a minute per bench (model init on the GPU, 2 x (WARMUP + STEPS) steps).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu-bench}"
STEPS="${STEPS:-15}"
WARMUP="${WARMUP:-3}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

if ! "$PY" -c "import pydantic, yaml" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        site="$(mktemp -d)/site"
        "$PY" -m pip install --quiet --no-deps --no-index --target "$site" .whl/*.whl
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_bench: pydantic or pyyaml is missing and .whl/ has no wheels; see the header" >&2
        exit 2
    fi
fi

"$PY" - <<'EOF'
import sys

import torch
import transformers

if not torch.cuda.is_available():
    sys.exit("gpu_bench: torch sees no CUDA device; this script measures a GPU")
print(
    f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
    f"transformers {transformers.__version__}, {torch.cuda.get_device_name()} "
    f"({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
)
EOF
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.max.sm,power.limit --format=csv || true

"$PY" -m distill bench recipes/bench-reference.yaml "$@" \
    --steps "$STEPS" --warmup "$WARMUP" --json "$OUT/bench.json" | tee "$OUT/bench.txt"

if [[ "${ALL_KINDS:-0}" == 1 ]]; then
    # Every loss kind gets the memory-efficient path: its peak memory, chunked only.
    for kind in reverse_kl jsd skew_kl skew_reverse_kl tv logit_mse; do
        "$PY" -m distill bench recipes/bench-reference.yaml "$@" \
            "stages.distilled.objective.terms.0.kind=$kind" --paths chunked \
            --steps 3 --warmup 1 --json "$OUT/bench-$kind.json" | tee "$OUT/bench-$kind.txt"
    done
fi
