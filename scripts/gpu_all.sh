#!/usr/bin/env bash
# Both GPU checks (issue 17's copy path, issue 22's sparse attention) in one device call, sized for one
# 15-minute lease: the sparse correctness check runs beside the tiny smoke run (neither is timed),
# then the measured runs one after another. Every step's cap is below; the whole run ends within
# TOTAL seconds (default 600: a fresh 15-minute lease less the machine's start) and packs what it
# produced into $OUT/gpu_results.tgz, with the two summaries beside it (the device tool brings back at
# most 8 files).
#   OUT=/some/dir bash scripts/gpu_all.sh
#   COPY_STEPS="llama8b_bf16 llama8b_fp32_8k"  which of gpu_check.sh's measured steps run (default below);
#   SPARSE_STEPS="llama8b memory fill"  which of gpu_check_sparse.sh's measured steps run (default below);
#   CAP_<step>=S and CAP_sparse=S change their caps; QUICK=1 / PREFETCH=N go to gpu_check_sparse.sh
set -u
OUT=${OUT:-results/gpu_all}
mkdir -p "$OUT"
work=$(mktemp -d /tmp/kvtier-gpu-XXXX)
export PYTHONUNBUFFERED=1
total=${TOTAL:-600}
COPY_STEPS=${COPY_STEPS:-"llama8b_bf16 vllm_layouts vllm_layouts_service"}  # llama8b_throttled: met, left out
SPARSE_STEPS=${SPARSE_STEPS:-"llama8b memory"}  # issue 22's measured steps, in order  # issue 17's measured steps, in order
(
    OUT=$work/sparse ONLY=correctness CAP_correctness=${CAP_correctness:-70} bash scripts/gpu_check_sparse.sh \
        > "$work/sparse_correctness.out" 2>&1 &
    OUT=$work/copy ONLY=tiny_cuda CAP_tiny_cuda=45 bash scripts/gpu_check.sh > "$work/copy_tiny.out" 2>&1
    wait
    OUT=$work/copy ONLY="$COPY_STEPS" CAP_llama8b_bf16=${CAP_llama8b_bf16:-180} \
        CAP_vllm_layouts=${CAP_vllm_layouts:-60} CAP_vllm_layouts_service=${CAP_vllm_layouts_service:-45} \
        CAP_llama8b_throttled=${CAP_llama8b_throttled:-50} \
        CAP_llama8b_fp32_8k=${CAP_llama8b_fp32_8k:-60} bash scripts/gpu_check.sh
    OUT=$work/sparse ONLY="$SPARSE_STEPS" CAP_llama8b=${CAP_sparse:-200} CAP_memory=${CAP_memory:-50} \
        CAP_fill=${CAP_fill:-60} bash scripts/gpu_check_sparse.sh
) &
runner=$!
( sleep "$total"; echo "== gpu_all: TOTAL $total s reached, stopping"; pkill -TERM -P $runner; kill -TERM $runner ) &
watchdog=$!
wait $runner
kill $watchdog 2>/dev/null
cat "$work/sparse_correctness.out" "$work/copy_tiny.out" > "$work/first_steps.txt" 2>/dev/null
cp "$work/copy/summary.txt" "$OUT/copy_summary.txt" 2>/dev/null
cp "$work/sparse/summary.txt" "$OUT/sparse_summary.txt" 2>/dev/null
tar -czf "$OUT/gpu_results.tgz" -C "$work" .
echo "== gpu_all: results in $OUT/gpu_results.tgz"
cat "$OUT/copy_summary.txt" "$OUT/sparse_summary.txt" 2>/dev/null | tail -c 6000
