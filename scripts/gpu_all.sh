#!/usr/bin/env bash
# Both GPU checks (issue 17's copy path, issue 22's sparse attention) in one device call, sized for one
# 15-minute lease: the sparse correctness check runs beside the tiny smoke run (neither is timed),
# then the measured runs one after another. Every step's cap is below; the whole run ends within
# TOTAL seconds (default 520: the device tool stops a command at 600 s, or sooner when less device time
# is left) and packs what it produced into $OUT/gpu_results.tgz after each phase (a run stopped from
# outside keeps the phases it finished), with the two summaries beside it (the device tool brings back
# at most 8 files). Run it with the device tool's timeout_s 600.
#   OUT=/some/dir bash scripts/gpu_all.sh
#   COPY_STEPS="llama8b_bf16 llama8b_fp32_8k"  which of gpu_check.sh's measured steps run (default below);
#   SPARSE_STEPS="llama8b memory fill"  which of gpu_check_sparse.sh's measured steps run (default below);
#   CAP_<step>=S and CAP_sparse=S change their caps; QUICK=1 / PREFETCH=N go to gpu_check_sparse.sh
set -u
OUT=${OUT:-results/gpu_all}
mkdir -p "$OUT"
work=$(mktemp -d /tmp/kvtier-gpu-XXXX)
export PYTHONUNBUFFERED=1
total=${TOTAL:-520}  # the device tool's per-command limit is 600 s, less when less device time is left
COPY_STEPS=${COPY_STEPS:-"llama8b_bf16 vllm_layouts vllm_layouts_service"}  # llama8b_throttled: met, left out
SPARSE_STEPS=${SPARSE_STEPS:-"llama8b memory"}  # issue 22's measured steps, in order  # issue 17's measured steps, in order
pack() {  # what has been produced so far, under $OUT: a run cut short (the tool's own limit) keeps it
    cat "$work/sparse_correctness.out" "$work/copy_tiny.out" > "$work/first_steps.txt" 2>/dev/null
    cp "$work/copy/summary.txt" "$OUT/copy_summary.txt" 2>/dev/null
    cp "$work/sparse/summary.txt" "$OUT/sparse_summary.txt" 2>/dev/null
    tar -czf "$OUT/gpu_results.tgz.part" -C "$work" . 2>/dev/null && mv -f "$OUT/gpu_results.tgz.part" "$OUT/gpu_results.tgz"
}
killtree() {  # killtree PID SIGNAL: the process and every descendant (timeout(1) puts its child in a
    local child   # process group of its own, so a group kill would miss the steps' python processes)
    for child in $(pgrep -P "$1"); do killtree "$child" "$2"; done
    kill -"$2" "$1" 2>/dev/null
}
(
    OUT=$work/sparse ONLY=correctness CAP_correctness=${CAP_correctness:-70} bash scripts/gpu_check_sparse.sh \
        > "$work/sparse_correctness.out" 2>&1 &
    OUT=$work/copy ONLY=tiny_cuda CAP_tiny_cuda=45 bash scripts/gpu_check.sh > "$work/copy_tiny.out" 2>&1
    wait
    touch "$work/.phase1"
    OUT=$work/copy ONLY="$COPY_STEPS" CAP_llama8b_bf16=${CAP_llama8b_bf16:-180} \
        CAP_vllm_layouts=${CAP_vllm_layouts:-60} CAP_vllm_layouts_service=${CAP_vllm_layouts_service:-45} \
        CAP_llama8b_throttled=${CAP_llama8b_throttled:-50} \
        CAP_llama8b_fp32_8k=${CAP_llama8b_fp32_8k:-60} bash scripts/gpu_check.sh
    touch "$work/.phase2"
    OUT=$work/sparse ONLY="$SPARSE_STEPS" CAP_llama8b=${CAP_sparse:-200} CAP_memory=${CAP_memory:-50} \
        CAP_fill=${CAP_fill:-60} bash scripts/gpu_check_sparse.sh
) &
runner=$!
started=$SECONDS
packed=""
while kill -0 $runner 2>/dev/null; do  # the watchdog, in this shell: no background sleep left holding the output
    for phase in .phase1 .phase2; do
        if [ -e "$work/$phase" ] && [[ " $packed " != *" $phase "* ]]; then pack; packed="$packed $phase"; fi
    done
    if [ $((SECONDS - started)) -ge "$total" ]; then
        echo "== gpu_all: TOTAL $total s reached, stopping"
        killtree $runner TERM
        sleep 3
        killtree $runner KILL
        break
    fi
    sleep 1
done
wait $runner 2>/dev/null
pack
echo "== gpu_all: results in $OUT/gpu_results.tgz"
cat "$OUT/copy_summary.txt" "$OUT/sparse_summary.txt" 2>/dev/null | tail -c 6000
