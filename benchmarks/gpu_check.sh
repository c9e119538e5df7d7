#!/usr/bin/env bash
# The DP-SGD step captured as a CUDA graph, on a machine with an NVIDIA GPU, in about 2 minutes (at most 4 and a half):
#   1. benchmarks/check_graph.py: the graphed step gives the padded eager step's parameters (noise multiplier 0;
#      MLP, CNN, CNN2; both ways of clipping; SGD and Adam), and its noise is new at every replay;
#   2. benchmarks/bench_jobs.py --device cuda at batch 512 (with the cpu/cuda agreement) and 4096: DP-SGD's
#      throughput as a share of plain SGD's, with the step captured as a graph and eager, in the same rounds.
#
#   bash benchmarks/gpu_check.sh            (from anywhere; PYTHON=... to name the interpreter)
#
# Needs torch with CUDA, and traitlets (paitient's settings) and opacus (the accountant, for the benchmark's
# noisy steps). A machine without them takes their wheels from .whl/ in the repository's root, installed into
# /tmp/site; fetch them where pip works with
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl opacus==1.6.0 traitlets==5.16.1
# (both pure Python; opacus' own needs, numpy, scipy and opt-einsum, are there on such machines).
# The output goes to the terminal and to $OUT/gpu_check.log (or /tmp/gpu_check.log); the exit status is 0
# only when every part passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=extensions${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log=${OUT:-/tmp}/gpu_check.log

main() {
    local status=0 start=$SECONDS
    "$PY" -c "import torch, traitlets, opacus; assert torch.cuda.is_available(), 'torch sees no GPU'" || {
        echo "gpu_check: torch with a GPU, traitlets and opacus are needed (see the head of this script)"
        return 2
    }
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    echo "== 1. the graphed step is the padded eager step; fresh noise at each replay"
    timeout 100 "$PY" benchmarks/check_graph.py || status=1
    echo "== 2. throughput, batch 512 ($((SECONDS - start)) s so far)"
    timeout 90 "$PY" benchmarks/bench_jobs.py --device cuda --batch 512 --steps 40 --blocks 3 --threads 8 \
        --skip utility,runner || status=1
    echo "== 3. throughput, batch 4096 ($((SECONDS - start)) s so far)"
    timeout 70 "$PY" benchmarks/bench_jobs.py --device cuda --batch 4096 --steps 40 --blocks 3 --threads 8 \
        --skip agree,utility,runner || status=1
    echo "gpu_check: $([ $status = 0 ] && echo passed || echo FAILED) in $((SECONDS - start)) s"
    return $status
}

main 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
