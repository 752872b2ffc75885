#!/usr/bin/env bash
# Issue 17's GPU check in one go, for a session that has a CUDA machine (at most 9.5 minutes: each step has a
# time cap that sums to 565 s; most of it on an H200 should take far less). Results: JSON and logs under $OUT.
# Run from the repository root: `OUT=/some/dir bash scripts/gpu_check.sh` (default OUT: results/gpu).
# It needs torch with CUDA, transformers, numpy, xxhash, rich; not vLLM, matplotlib or pytest.
# Every step writes its JSON and log under $OUT and the script goes on when one fails.
# ONLY="a b" runs only the named steps, SKIP="a b" leaves them out, CAP_<step>=S changes a step's time cap.
set -u
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python3 || command -v python)}  # python3: what the GPU machine names for sure
status=0

step() {  # step NAME TIMEOUT_S ARGS...: one bench run, its log and exit code kept
    local name=$1 limit=$2
    shift 2
    case " ${SKIP:-} " in *" $name "*) echo "== $name: skipped (SKIP)" | tee -a "$OUT/summary.txt"; return;; esac
    case " ${ONLY:-$name} " in *" $name "*) ;; *) return;; esac
    local var="CAP_$name"
    limit=${!var:-$limit}
    echo "== $name: $*" | tee -a "$OUT/summary.txt"
    timeout "$limit" "$PY" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $rc" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

"$PY" - > "$OUT/env.txt" 2>&1 <<'PY'
import os, platform, resource
import torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")
print("RLIMIT_MEMLOCK", resource.getrlimit(resource.RLIMIT_MEMLOCK), "cpus", os.cpu_count())
PY
cat "$OUT/env.txt"

# 1. smoke: every code path on the GPU with a tiny model (seconds), in float32 (max_logit_diff <= 1e-3)
step tiny_cuda 45 -m kvtier bench ttft --device cuda --shape tiny --dtype float32 --lengths 512,2048 --repeats 2 \
    --json "$OUT/ttft_tiny_cuda.json" --png ""
# 2. the measured run: Llama-3.1-8B shape, bfloat16, 8k and 32k (issue 17 "How it is measured")
step llama8b_bf16 240 -m kvtier bench ttft --device cuda --shape llama-8b --dtype bfloat16 \
    --json "$OUT/ttft_llama8b_bf16.json" --png ""
# 3. float32 at 8k: max_logit_diff <= 1e-3 and top1_equal
step llama8b_fp32_8k 90 -m kvtier bench ttft --device cuda --shape llama-8b --dtype float32 --lengths 8192 \
    --json "$OUT/ttft_llama8b_fp32_8k.json" --png ""
# 4. never slower than recomputing from a slow disk (the planner must recompute every disk chunk)
step llama8b_throttled 75 -m kvtier bench ttft --device cuda --shape llama-8b --dtype bfloat16 --lengths 8192 \
    --throttle-disk-gbps 0.5 --json "$OUT/ttft_llama8b_throttled.json" --png ""
# 5. vLLM GPU adapters (no vLLM needed): 2048 blocks of 16 tokens, Llama-8B KV (32 layers, 8 x 128, bf16),
#    save -> load through the batched adapters and an in-process store, byte-exact under every
#    KVCacheLayout order, load_gbps against pinned h2d; whether the store's pool is page-locked
step vllm_layouts 115 scripts/gpu_vllm_layouts.py --device cuda --json "$OUT/vllm_layouts.json"
# 6. the same load through a `kvtier serve` started there (what vLLM's worker talks to): the worker's direct
#    loads read the service's shared-memory pool, registered with CUDA by the client
step vllm_layouts_service 60 scripts/gpu_vllm_layouts.py --device cuda --client service --orders LBNHC \
    --json "$OUT/vllm_layouts_service.json"

"$PY" - "$OUT" >> "$OUT/summary.txt" 2>&1 <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for lay in (out / "vllm_layouts.json", out / "vllm_layouts_service.json"):
    if not lay.exists():
        continue
    d = json.loads(lay.read_text())
    print(f"{lay.stem}: client {d['setup'].get('client')} h2d_pinned_gbps={d['setup'].get('h2d_pinned_gbps')}")
    for c in d["cases"]:
        print(f"  {c['order']}: layers {c['layers']} byte_exact {c['byte_exact']} load_gbps {c['load_gbps']:.1f} "
              f"(x{c.get('load_vs_pinned', 0):.2f} pinned, direct_chunks {c.get('direct_chunks')}) "
              f"save_s {c['save_s']:.3f} pool {c.get('pool', '')}")
        if "staged_load_gbps" in c:
            print(f"    staged: byte_exact {c['staged_byte_exact']} load_gbps {c['staged_load_gbps']:.1f} "
                  f"(x{c.get('staged_load_vs_pinned', 0):.2f} pinned)")
for f in sorted(out.glob("ttft_*.json")):
    d = json.loads(f.read_text())
    s = d["setup"]
    print(f"{f.name}: h2d_pinned_gbps={s.get('h2d_pinned_gbps')} odirect_read_gbps={s.get('odirect_read_gbps')} "
          f"direct_loads={s.get('direct_loads')} direct_saves={s.get('direct_saves')} pool_copy={s.get('pool_copy')} overlap={d.get('overlap')}")
    for c, x in zip(d["cases"], d["details"]):
        print(f"  {c['prompt_tokens']:>6}: plain {c['no_kvtier_s']:.4f} miss {c['miss_s']:.4f} "
              f"(published {c['miss_published_s']:.4f}) dram {c['dram_hit_s']:.4f} (floor {c['dram_floor_s']:.4f}) "
              f"disk {c['disk_hit_s']:.4f} (floor {c['disk_floor_s']:.4f}) load_gbps {c['load_gbps']:.1f} "
              f"max_logit_diff {c['max_logit_diff']:.2e} top1_equal {c['top1_equal']} (decisive {c.get('top1_decisive')}) "
              f"disk chunks loaded {x['chunks_loaded']} recomputed {x['chunks_recomputed']}")
PY
cat "$OUT/summary.txt"
exit $status
