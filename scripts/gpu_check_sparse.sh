#!/usr/bin/env bash
# Issue 22's GPU check (sparse attention on the GPU) in one go, for a session with a CUDA machine.
# Run from the repository root: `OUT=/some/dir bash scripts/gpu_check_sparse.sh` (default OUT: results/gpu_sparse).
# Needs torch with CUDA and transformers (no vLLM, matplotlib or pytest). Each step has a time cap
# (about 12 minutes in all) and writes its JSON and log under $OUT; the script goes on when one fails.
# SKIP_FULL=1 skips the last (longest) step, the full llama-8b run.
set -u
OUT=${OUT:-results/gpu_sparse}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
status=0

step() {  # step NAME TIMEOUT_S ARGS...: one kvtier run, its log and exit code kept
    local name=$1 limit=$2
    shift 2
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

# 1. correctness on the GPU (float32): a full budget gives dense's greedy tokens; a 1/8 budget decodes;
#    everything (working sets, summaries, staging) is where the model is; a missing block raises.
cat > "$OUT/check_sparse_cuda.py" <<'PY'
import torch
from transformers import DynamicCache
from kvtier.bench.sparse_device import build_model
from kvtier.connectors.transformers.sparse import ATTN_NAME, KVTierSparseCache, register, model_kv_layout
from kvtier.core.config import MemoryTierConfig, StoreConfig
from kvtier.sparse import SparseConfig, sparse_store_layout
from kvtier.store.tiered import TieredStore

register()
dev = torch.device("cuda")
for shape, ctx in (("tiny", 2048), ("llama-1b", 4096)):
    model = build_model(shape, dev, torch.float32, 16384)
    layout = model_kv_layout(model.config, "float32")
    ids = torch.randint(0, model.config.vocab_size, (1, ctx), device=dev)

    def greedy(cache, impl, steps=16):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            toks = [out.logits[:, -1].argmax(-1, keepdim=True)]
            for _ in range(steps - 1):
                out = model(toks[-1], past_key_values=cache, use_cache=True)
                toks.append(out.logits[:, -1].argmax(-1, keepdim=True))
        return torch.cat(toks, 1)

    dense = greedy(DynamicCache(config=model.config), "sdpa")
    for budget in (2 * ctx, ctx // 8):
        store = TieredStore(StoreConfig(chunk_tokens=64, memory=MemoryTierConfig(capacity_bytes=4 * ctx * layout.token_bytes_per_layer() * layout.num_layers + (64 << 20))),
                            sparse_store_layout(layout))
        cache = KVTierSparseCache(store, SparseConfig(policy="quest", budget_tokens=budget, block_tokens=64, sink_tokens=64, window_tokens=128), model_config=model.config)
        toks = greedy(cache, ATTN_NAME)
        seq = cache.sequences[0]
        assert seq.working[0].k.is_cuda and seq.tables[0].device.type == "cuda", "working set / summaries not on the GPU"
        print(f"{shape} ctx {ctx} budget {budget}: staged={seq.stage_fetches} pinned={seq._fill_staging.pinned} "
              f"tokens equal dense: {torch.equal(toks, dense)} ({int((toks == dense).sum())}/{toks.numel()})", flush=True)
        if budget > ctx:
            assert torch.equal(toks, dense), "full budget must give dense's greedy tokens in float32"
        store.close()
    del model
    torch.cuda.empty_cache()
print("OK")
PY
step correctness 150 "$OUT/check_sparse_cuda.py"
# 2. smoke: every row of the device bench on the GPU with the tiny shape
step tiny_cuda 120 -m kvtier bench sparse --quick --device cuda --shape tiny --json "$OUT/sparse_tiny_cuda.json"
# 3. llama-8b, bfloat16, quick sizes (8k and 32k decode, 8k prefill, 16k batched)
step llama8b_quick 240 -m kvtier bench sparse --quick --device cuda --shape llama-8b \
    --json "$OUT/sparse_llama8b_quick.json"
# 4. the measured run of the issue: 32k and 128k decode at budget 1/16, 32k prefill, capped memory, 64k batched
if [ -z "${SKIP_FULL:-}" ]; then
    step llama8b_full 420 -m kvtier bench sparse --device cuda --shape llama-8b \
        --json "$OUT/sparse_llama8b.json"
fi

"$PY" - "$OUT" >> "$OUT/summary.txt" 2>&1 <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("sparse_*.json")):
    d = json.loads(f.read_text())
    print(f.name, d["setup"])
    for r in d["gpu_decode"]:
        print("  decode", {k: r[k] for k in ("context_tokens", "budget_tokens", "drift", "retrieval_churn",
              "dense_token_ms", "sparse_token_ms", "dense_kv_gpu_bytes", "sparse_kv_gpu_bytes")})
    for r in d["prefill"]:
        print("  prefill", r, "ratio", r["sparse_s"] / r["dense_s"])
    print("  max_context", d["max_context"])
    print("  batched", d["batched"])
PY
cat "$OUT/summary.txt"
exit $status
