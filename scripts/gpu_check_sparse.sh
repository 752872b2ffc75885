#!/usr/bin/env bash
# Issue 22's GPU check (sparse attention on the GPU) in one go, for a session with a CUDA machine.
# Run from the repository root: `OUT=/some/dir bash scripts/gpu_check_sparse.sh` (default OUT: results/gpu_sparse).
# Needs torch with CUDA and transformers (no vLLM, matplotlib or pytest). The whole run is capped at
# under 7 minutes (steps: 10 + 80 + 60 + 260 s), so a 15-minute device lease leaves room for a rerun. Every
# step writes its JSON and log under $OUT and the script goes on when one fails; the bench writes its
# JSON after every row, so a step cut short by its cap keeps the rows it finished.
#   QUICK=1   the bench's --quick sizes (8k/32k decode, 8k prefill, 16k batched) instead of the issue's
#   PREFETCH=N  decode prefetch blocks for the bench (default: the bench's, 4 on CUDA)
#   ONLY="a b" runs only the named steps, SKIP="a b" leaves them out, CAP_<step>=S changes a step's time cap
#   FILL=1    also runs step 3 (about a minute): the per-layer host time of decode's fill at 128k, split
#             into its parts (scripts/profile_sparse_fill.py --device cuda); ONLY=fill runs it alone
set -u
OUT=${OUT:-results/gpu_sparse}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python3 || command -v python)}  # python3: what the GPU machine names for sure
status=0

step() {  # step NAME TIMEOUT_S ARGS...: one kvtier run, its log and exit code kept
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
import torch, transformers, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")
PY
cat "$OUT/env.txt"

# 1. correctness on the GPU (float32, ~1 min): a full budget gives dense's greedy tokens; a 1/8 budget
#    decodes, with and without prefetch to the same tokens; everything (working sets, summaries,
#    staging) is where the model is; the device -> host syncs of one decode step are counted (the
#    design has one per layer: the plan copy); the background writer's blocks are in the store.
cat > "$OUT/check_sparse_cuda.py" <<'PY'
import json, os, warnings
import torch
from transformers import DynamicCache
from kvtier.bench.sparse_device import build_model
from kvtier.connectors.transformers.sparse import ATTN_NAME, KVTierSparseCache, register, model_kv_layout
from kvtier.core.config import MemoryTierConfig, StoreConfig
from kvtier.sparse import SparseConfig, sparse_store_layout
from kvtier.store.tiered import TieredStore

register()
dev = torch.device(os.environ.get("DEVICE", "cuda"))  # DEVICE=cpu: a dry run of the same code
report = []
shapes = os.environ.get("CHECK_SHAPES", "tiny:2048,llama-1b:4096")  # shape:context pairs
for shape, ctx in ((p.split(":")[0], int(p.split(":")[1])) for p in shapes.split(",")):
    model = build_model(shape, dev, torch.float32, 16384)
    layout = model_kv_layout(model.config, "float32")
    ids = torch.randint(0, model.config.vocab_size, (1, ctx), device=dev)

    def greedy(cache, impl, steps=16, count_syncs=False):
        model.set_attn_implementation(impl)
        syncs = None
        with torch.no_grad():
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            toks = [out.logits[:, -1].argmax(-1, keepdim=True)]
            for i in range(steps - 1):
                if count_syncs and dev.type == "cuda" and i == steps // 2:  # one warm step, counted
                    torch.cuda.synchronize()
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        torch.cuda.set_sync_debug_mode("warn")
                        try:
                            out = model(toks[-1], past_key_values=cache, use_cache=True)
                        finally:
                            torch.cuda.set_sync_debug_mode("default")
                    syncs = sum("synchroniz" in str(w.message) for w in caught)
                else:
                    out = model(toks[-1], past_key_values=cache, use_cache=True)
                toks.append(out.logits[:, -1].argmax(-1, keepdim=True))
        return torch.cat(toks, 1), syncs

    dense, dense_syncs = greedy(DynamicCache(config=model.config), "sdpa", count_syncs=True)
    by_budget = {}
    for budget, prefetch in ((2 * ctx, 0), (ctx // 8, 0), (ctx // 8, 4)):
        store = TieredStore(StoreConfig(chunk_tokens=64, memory=MemoryTierConfig(capacity_bytes=4 * ctx * layout.token_bytes_per_layer() * layout.num_layers + (64 << 20))),
                            sparse_store_layout(layout))
        cache = KVTierSparseCache(store, SparseConfig(policy="quest", budget_tokens=budget, block_tokens=64, sink_tokens=64,
                                                      window_tokens=128, prefetch_blocks=prefetch), model_config=model.config)
        toks, syncs = greedy(cache, ATTN_NAME, count_syncs=True)
        seq = cache.sequences[0]
        cache.flush()
        assert seq.working[0].k.device.type == dev.type and seq.tables[0].device.type == dev.type, \
            "working set / summaries not on the model's device"
        assert store.lookup(seq.block_keys).hits == len(seq.block_keys), "a written block is missing from the store"
        pf = seq._prefetch
        row = {"shape": shape, "ctx": ctx, "budget": budget, "prefetch_blocks": prefetch, "staged": seq.stage_fetches,
               "pinned": seq._fill_staging.pinned, "tokens_equal_dense": bool(torch.equal(toks, dense)),
               "tokens_match": int((toks == dense).sum()), "tokens": toks.numel(),
               "syncs_per_decode_step": syncs, "dense_syncs_per_decode_step": dense_syncs,
               "layers": model.config.num_hidden_layers,
               "prefetch_used": pf.used_slices if pf else 0, "prefetched": pf.prefetched_slices if pf else 0}
        print(row, flush=True)
        report.append(row)
        if budget > ctx:
            assert torch.equal(toks, dense), "full budget must give dense's greedy tokens in float32"
        by_budget.setdefault(budget, []).append(toks)
        cache.close()
        store.close()
    pair = by_budget[ctx // 8]
    assert torch.equal(pair[0], pair[1]), "prefetch changed the tokens"
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
json.dump(report, open(os.path.join(os.environ["OUT"], "check_sparse_cuda.json"), "w"), indent=2)
print("OK")
PY
export OUT
step correctness 80 "$OUT/check_sparse_cuda.py"
# 2. the measured run of the issue (llama-8b, bf16): 32k and 128k decode at budget 1/16 (drift 0 and
#    0.98), 32k prefill, capped memory, 64k batched; QUICK=1 for the smaller sizes
args=(-m kvtier bench sparse --device cuda --shape llama-8b)
[ -n "${QUICK:-}" ] && args+=(--quick)
[ -n "${PREFETCH:-}" ] && args+=(--prefetch-blocks "$PREFETCH")
step llama8b 260 "${args[@]}" --json "$OUT/sparse_llama8b.json"
# 3. (after the measured run: a run cut short loses this, not that) where decode's GPU memory goes (scripts/sparse_memory.py): 4 layers of the 8B shape at 128k tokens
#    of random bf16 KV, budget 1/16, quest, prefetch 4; held bytes by kind, the transient peak of a step by
#    allocating function, torch.cuda.max_memory_allocated over the same steps, and a memory snapshot
#    (open memory_snapshot.pickle at pytorch.org/memory_viz) for what the dispatch-level count cannot see
step memory 60 scripts/sparse_memory.py --device cuda --layers 4 --context 131072 --dtype bfloat16 \
    --prefetch-blocks 4 --json "$OUT/sparse_memory.json" --cuda-snapshot "$OUT/memory_snapshot.pickle"

# 4. (FILL=1 or ONLY=fill) where decode's host time per layer goes at the 8B layer shape, 128k context,
#    budget 1/16, drift 0.98: selection, plan, gather+verify, staging copy, write_slots, prefetch
if [ -n "${FILL:-}" ] || [[ " ${ONLY:-} " == *" fill "* ]]; then
    step fill 120 scripts/profile_sparse_fill.py --device cuda --threads "$(nproc)" --json "$OUT/fill_profile.json"
fi

"$PY" - "$OUT" >> "$OUT/summary.txt" 2>&1 <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("sparse_*.json")):
    d = json.loads(f.read_text())
    print(f.name, d["setup"], d.get("meta"))
    for r in d.get("gpu_decode", []):
        print("  decode", {k: r.get(k) for k in ("context_tokens", "budget_tokens", "drift", "retrieval_churn",
              "dense_token_ms", "sparse_token_ms", "dense_kv_gpu_bytes", "sparse_kv_gpu_bytes",
              "prefetch_used_slices", "prefetched_slices", "fetched_slices", "sparse_held_bytes",
              "sparse_unaccounted_before_decode_bytes", "sparse_traced_step")})
    for r in d.get("prefill", []):
        print("  prefill", r, "ratio", r["sparse_s"] / r["dense_s"])
    print("  max_context", d.get("max_context"))
    print("  batched", d.get("batched"))
fill = pathlib.Path(sys.argv[1]) / "fill_profile.json"
if fill.is_file():
    d = json.loads(fill.read_text())
    print("fill_profile: churn", d["retrieval_churn"], "slices/layer", d["new_slices_per_layer_step"],
          "ms per layer and step", {k: round(v, 3) for k, v in d["ms_per_layer_step"].items()},
          "bytes-alone floor ms", round(d["gather_verify_floor_ms"], 3))
PY
cat "$OUT/summary.txt"
exit $status
