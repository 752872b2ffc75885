"""TransformersConnector: a transformers model bound to a kvtier store, and `kvtier_generate`.

    conn = TransformersConnector(model, store, tenant_salt="")   # once per model and store
    out = kvtier_generate(model, input_ids, conn, max_new_tokens=32)   # == model.generate(...)
    cache, out = conn.prefill(input_ids)          # one forward over the prompt (logits, cache)
    cache = conn.new_cache(); plan = cache.prepare(input_ids)   # the raw contract (cache.py)

`store` is a kvtier TieredStore or a kvtier.client StoreClient (in-process or the host
service); only lookup, load, begin_save and the layout / chunk size properties are used.

Keys: a KeyChain under Namespace(model fingerprint, KVLayout(layers, KV heads, head size,
dtype).layout_id(chunk size), rank 0, tenant salt, the store's hash mode). The fingerprint is
`identity.model_identity` (canonical config + a digest of the weights; see identity.py) unless
given; weights modified in place or replaced since are seen at the next prepare (a cheap check of
every weight's version counter, identity.weights_state) and hashed again, so the connector never
names one set of weights' KV with another's keys (an explicit `fingerprint=` is the caller's word:
not checked). The model must keep full per-token KV in every layer (compat.check_full_kv) and its
layout must equal the store's.

Failures are counted in `metrics` (the store's Metrics when it has one) with label
connector="transformers" and logged once per kind per connector: load failures (chunks that
were recomputed), save failures (chunks not stored: store full, read-only, I/O error).

Never slower than recomputing: a stored chunk is loaded only where the load planner
(kvtier.store.planner) estimates its load to be faster than computing its tokens. Its
bandwidths start from a short probe of each tier when the connector opens (unless the process
already knows that tier) and are refined by every load; the compute cost per token is measured
on `prefill`'s forwards. Chunks recomputed that way are counted in LOADS_SKIPPED and shown per
row in `plan.skipped_tokens`. `prefill` and `generate` also compute the head of a slow prefix
while its tail loads (planner.head_and_loads; counted in HEAD_TOKENS, shown in `plan.head_tokens`):
a hit then costs about the longer of the two, not their sum. The head's own forward costs a
little beyond its tokens; that cost is measured on every head and a head is planned only where
it gains more. `plan_loads=False` loads every stored chunk.

Devices: the cache lives on the model's device (all its weights must be on one); the plan's
input ids, mask and positions are handed to the model there. On CUDA (copy_engine.py), when the
store is an in-process TieredStore whose DRAM pool is page-locked, a prefix wholly in DRAM is
copied straight out of the pool's slots (`direct_loads`): its chunks are borrowed (pinned against
eviction), each group of layers (about DIRECT_GROUP_BYTES per chunk) is one batch of copies on
the load stream with one event, verified against its checksums on the store's verify threads
while it copies, and layer i's update waits for its group's event and check only; the chunks
are released once the copies completed. Other loads (disk hits, a service client) are staged
in a reused page-locked buffer and copied per layer on a load stream the forward waits on by
event. Saves are copied on a save stream after each layer's compute: with `direct_saves` (the
same condition as direct_loads) straight into the DRAM slots the store reserved for them (no
staging, no host copy), a group of layers (`save_group_layers`) per copy, each group marked
filled by a worker thread once its copy completed, which starts its checksums on the store's
verify threads; otherwise into a page-locked buffer that the worker writes to the store. After
the last layer the worker publishes (`save_copies.drain()` waits for it: call it before closing
the store). On the CPU the same code runs synchronously, checksums in the forward's thread.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from kvtier.connectors.copy_engine import (
    DIRECT_GROUP_BYTES,
    host_registry,
    model_device,
    page_lock_pool,
    same_device,
    shared_pools,
    synchronize,
)
from kvtier.connectors.transformers.cache import KVTierCache, PrefillPlan, PrefixLoadError
from kvtier.connectors.transformers.compat import UnsupportedModelError, cache_kwarg, check_full_kv, text_config
from kvtier.connectors.transformers.identity import (
    TORCH_DTYPES,
    model_identity,
    model_layout,
    persistent_buffer_names,
    weights_state,
)
from kvtier.core import metrics as m
from kvtier.core.errors import LayoutMismatchError
from kvtier.core.keys import KeyChain, Namespace
from kvtier.store import probe
from kvtier.store.planner import ESTIMATES, MIN_OBSERVED_CHUNKS, CostEstimates, chunks_worth_loading, head_and_loads

log = logging.getLogger(__name__)

CONNECTOR = "transformers"
SAVE_FAILURES = m.SAVE_FAILURES
PREFILL_TOKENS = m.PREFILL_TOKENS
MAX_ATTEMPTS = 4  # prepare + forward tries after load failures; the last one loads nothing


class TransformersConnector:
    def __init__(self, model: Any, store: Any, *, tenant_salt: str = "", fingerprint: str | None = None,
                 overlap: bool = True, save: bool = True, load: bool = True, metrics: m.Metrics | None = None,
                 device: torch.device | str | None = None, plan_loads: bool = True,
                 estimates: CostEstimates | None = None, direct_loads: bool | None = None,
                 direct_saves: bool | None = None) -> None:
        check_full_kv(model)
        self.model = model
        self.store = store
        self.layout = store.layout
        self.chunk_tokens: int = store.chunk_tokens
        self.hash_mode: str = getattr(store, "hash_mode", None) or store.config.hash_mode
        model_kv = model_layout(model)
        if model_kv != self.layout:
            raise LayoutMismatchError(f"the model's KV layout {model_kv} differs from the store's {self.layout}")
        self.torch_dtype = next(d for d, name in TORCH_DTYPES.items() if name == self.layout.dtype)
        self.device = model_device(model)
        if device is not None and not same_device(torch.device(device), self.device):
            raise LayoutMismatchError(f"device={torch.device(device)}: the model runs on {self.device}, and "
                                      "kvtier's cache must live where the model computes its KV")
        # weights changed in place since the fingerprint was taken are seen by refresh_identity (not
        # with an explicit fingerprint: the caller names the weights)
        self._buffers = persistent_buffer_names(model) if fingerprint is None else frozenset()
        self._weights_seen = weights_state(model, self._buffers) if fingerprint is None else None
        self.fingerprint = fingerprint or model_identity(model)
        self.namespace = Namespace(self.fingerprint, self.layout.layout_id(self.chunk_tokens),
                                   tenant_salt=tenant_salt, hash_mode=self.hash_mode)
        self.root = self.namespace.root()
        self.cache_kwarg = cache_kwarg(model)
        pad = getattr(model.config, "pad_token_id", None)
        vocab = getattr(text_config(model), "vocab_size", None)
        # the filler of the masked columns between a row's cached and computed tokens: a pad id the
        # embeddings do not have (a tokenizer's added pad token, never resized in) would be out of range
        self.pad_token_id = 0
        if isinstance(pad, int) and pad >= 0 and (not isinstance(vocab, int) or pad < vocab):
            self.pad_token_id = pad
        self.overlap = overlap
        self.save_enabled = save
        self.load_enabled = load
        self.metrics = metrics or getattr(store, "metrics", None) or m.Metrics()
        for name in m.CONNECTOR_COUNTERS:  # exposed at 0 from the start (see CONNECTOR_COUNTERS)
            self.metrics.inc(name, 0, connector=CONNECTOR)
        self._logged: set[str] = set()
        self._lock = threading.Lock()
        self.plan_loads = plan_loads
        self._keeps_logits: bool | None = None  # whether the model's forward takes logits_to_keep
        # loads' host staging (pinned on CUDA), saves' pinned buffers and their copy worker: the process's
        self.staging_pool, self.save_pool, self.save_copies = shared_pools(self.device)
        page_lock_pool(store, self.device)  # on CUDA: the store's DRAM pool page-locked once (skipped elsewhere)
        self.load_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.direct_loads = self._pick_direct(direct_loads, "direct_loads")
        self.direct_saves = self._pick_direct(direct_saves, "direct_saves")
        self._pool_tensor: torch.Tensor | None = None
        lb = self.layout.layer_bytes(self.chunk_tokens)
        self.load_group_layers = max(1, min(self.layout.num_layers, -(-DIRECT_GROUP_BYTES // lb)))
        self.save_group_layers = self.load_group_layers  # direct saves: layers per device -> pool copy
        self.estimates = estimates if estimates is not None else ESTIMATES
        self.engine_id = f"{self.fingerprint}|{self.device}|{self.layout.dtype}"
        self.chunk_bytes = self.layout.num_layers * self.layout.layer_bytes(self.chunk_tokens)
        if plan_loads:
            self._probe_tiers()

    def _pick_direct(self, want: bool | None, option: str) -> bool:
        """direct_loads / direct_saves: None = on where it pays (CUDA, and the store's DRAM pool
        page-locked); True (tests, or a CPU run of the same code) needs an in-process store with a DRAM tier."""
        store = self.store
        able = callable(getattr(store, "borrow_memory", None)) and getattr(store, "memory", None) is not None
        if want is None:
            if not able or self.device.type != "cuda":
                return False
            region = store.memory.pool_region()
            return (region.address, region.nbytes) in host_registry().registered()
        if want and not able:
            raise ValueError(f"{option}=True needs an in-process TieredStore with a DRAM tier (a kvtier serve "
                             "client's loads and saves are copied through staging)")
        return bool(want)

    def pool_tensor(self) -> torch.Tensor:
        """The store's DRAM pool as one uint8 host tensor (direct loads copy out of its slots)."""
        if self._pool_tensor is None:
            self._pool_tensor = torch.from_numpy(self.store.pool_array())
        return self._pool_tensor

    # -- keys and lookups ------------------------------------------------------------------------
    def refresh_identity(self) -> bool:
        """Hash the weights again if one was modified in place or replaced since they were hashed (a
        training step, load_state_dict): new keys for the new weights. True when they changed."""
        if self._weights_seen is None:
            return False
        now = weights_state(self.model, self._buffers)
        if now == self._weights_seen:
            return False
        self.fingerprint = model_identity(self.model)
        self.namespace = Namespace(self.fingerprint, self.layout.layout_id(self.chunk_tokens),
                                   tenant_salt=self.namespace.tenant_salt, hash_mode=self.hash_mode)
        self.root = self.namespace.root()
        self._weights_seen = weights_state(self.model, self._buffers)
        log.info("kvtier: the model's weights changed since they were fingerprinted; keys now under %s",
                  self.fingerprint[:16])
        return True

    def chunk_keys(self, tokens: list[int]) -> list[bytes]:
        return list(KeyChain(self.root, self.chunk_tokens, self.hash_mode).extend(tokens))

    def lookup(self, keys: list[bytes]) -> tuple[int, tuple[str, ...]]:
        if not keys:
            return 0, ()
        try:
            r = self.store.lookup(keys)
        except Exception as e:  # noqa: BLE001 - an unreachable store is a miss, counted and logged once
            self.report_load_failure(0, f"lookup failed: {type(e).__name__}: {e}")
            return 0, ()
        return r.hits, tuple(r.tiers)

    # -- load or recompute (store/planner.py) -----------------------------------------------------
    def tier_id(self, tier: str) -> str:
        return probe.tier_id(self.store, tier, str(self.device))

    def chunks_worth_loading(self, tiers: tuple[str, ...]) -> int:
        """How many leading stored chunks (held by `tiers`) are worth loading rather than recomputing."""
        if not self.plan_loads or not tiers:
            return len(tiers)
        bandwidths = {t: self.estimates.bandwidth(self.tier_id(t)) for t in set(tiers)}
        return chunks_worth_loading(tiers, self.chunk_bytes, self.chunk_tokens, bandwidths,
                                    self.estimates.seconds_per_token(self.engine_id))

    def head_and_loads(self, tiers: tuple[str, ...]) -> tuple[int, int]:
        """(head, n): compute stored chunks [0, head) while [head, n) load (planner.head_and_loads)."""
        if not self.plan_loads or not tiers:
            return 0, len(tiers)
        bandwidths = {t: self.estimates.bandwidth(self.tier_id(t)) for t in set(tiers)}
        return head_and_loads(tiers, self.chunk_bytes, self.chunk_tokens, bandwidths,
                              self.estimates.seconds_per_token(self.engine_id),
                              self.estimates.head_overhead(self.engine_id))

    def run_head(self, cache: KVTierCache, plan: PrefillPlan) -> Callable[[], None] | None:
        """The head forward of a plan that has one (prepare(head=True)): the prefix's leading tokens,
        computed while the rest of it loads. Its logits are not needed: only the last one is made.
        Returns a call that hands its time to the planner (after the prefill's forward: on a GPU it
        reads CUDA events, so the head's time is known without waiting for it here)."""
        if plan.head_input_ids is None:
            return None
        if self._keeps_logits is None:
            try:
                self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
            except (TypeError, ValueError):
                self._keeps_logits = False
        extra = {"logits_to_keep": 1} if self._keeps_logits else {}
        tokens = sum(plan.head_tokens)
        cuda = self.device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        with torch.no_grad():
            self.model(**plan.head_inputs(), **self.cache_kwargs(cache), use_cache=True, **extra)
        seconds = time.perf_counter() - t0
        if cuda:
            end.record()
        self.metrics.inc(m.HEAD_TOKENS, float(tokens), connector=CONNECTOR)

        def observe() -> None:
            if not self.plan_loads:
                return
            if cuda:
                end.synchronize()
                self.estimates.observe_head(self.engine_id, tokens, start.elapsed_time(end) / 1e3)
            else:
                self.estimates.observe_head(self.engine_id, tokens, seconds)

        return observe

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        if self.plan_loads:
            self.estimates.observe_load(self.tier_id(tier), nbytes, seconds)

    def observe_compute(self, tokens: int, seconds: float) -> None:
        """A forward over `tokens` tokens took `seconds` (short forwards are left out: see planner.py)."""
        if self.plan_loads and tokens >= MIN_OBSERVED_CHUNKS * self.chunk_tokens:
            self.estimates.observe_compute(self.engine_id, tokens, seconds)

    def report_skipped_loads(self, chunks: int) -> None:
        self.metrics.inc(m.LOADS_SKIPPED, float(chunks), connector=CONNECTOR)

    def _probe_tiers(self) -> None:
        """Seed the bandwidth of each tier this process has no estimate for (a few ms each)."""
        from kvtier.connectors.copy_engine import host_to_device_probe

        tiered = getattr(self.store, "store", self.store)
        mem_id = self.tier_id("memory")
        if not self.estimates.has_bandwidth(mem_id):
            n, s = probe.memcpy_probe()
            h2d = host_to_device_probe(self.device)
            if h2d is not None:  # DRAM -> GPU: a host copy, then the transfer
                s += h2d[1] * n / h2d[0]
            self.estimates.seed_bandwidth(mem_id, n, s)
        disk = getattr(tiered, "disk", None)
        root = getattr(disk, "root", None)
        disk_id = self.tier_id("disk")
        if root is not None and not self.estimates.has_bandwidth(disk_id):
            got = probe.disk_probe(root)
            if got is not None:
                self.estimates.seed_bandwidth(disk_id, *got)

    # -- the one-call paths ----------------------------------------------------------------------
    def new_cache(self) -> KVTierCache:
        return KVTierCache(self)

    def cache_kwargs(self, cache: KVTierCache) -> dict[str, KVTierCache]:
        """{"cache": cache} or {"past_key_values": cache}, as this transformers version expects."""
        return {self.cache_kwarg: cache}

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVTierCache | None = None, **forward_kwargs: Any) -> tuple[KVTierCache, Any]:
        """One forward over the prompt with the stored prefix loaded; retried after load failures.

        Returns (cache, output); output.logits[:, -1] are the logits after each row's last
        prompt token, and the cache holds the whole prompt (cache.last_plan says what was reused).
        """
        _refuse_unkeyed_inputs(forward_kwargs)
        if cache is not None and getattr(cache, "connector", None) is not self:
            raise ValueError("prefill(cache=...): the cache belongs to another connector; its keys name another "
                             "model's KV (make it with this connector's new_cache())")
        if input_ids.dim() == 2 and 0 in input_ids.shape:
            raise ValueError(f"prefill of an empty batch or prompt (input_ids {tuple(input_ids.shape)})")
        cache = cache or self.new_cache()
        caps = None
        for attempt in range(MAX_ATTEMPTS):
            if attempt == MAX_ATTEMPTS - 1:
                caps = [0] * input_ids.shape[0]
            plan = cache.prepare(input_ids, attention_mask, max_chunks=caps, head=True)
            try:
                head = self.run_head(cache, plan)
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = self.model(**plan.model_inputs(), **self.cache_kwargs(cache), use_cache=True,
                                     **forward_kwargs)
                if self.plan_loads:
                    synchronize(self.device)  # the logits are read next anyway: this costs the caller nothing
                    seconds = time.perf_counter() - t0 - cache.forward_wait_s - cache.forward_save_s
                    self.observe_compute(int(plan.input_ids.numel()), seconds)
                if head is not None:
                    head()
                return cache, out
            except PrefixLoadError as e:
                caps = list(e.valid_chunks)
            except BaseException:
                # a failed forward (out of memory, an interrupt): give back at once what the prefill
                # holds (borrowed chunks, reserved DRAM slots, staging); the cache refers to itself
                # through its layers, so only a garbage-collection pass would have freed them
                cache.discard()
                raise
        raise AssertionError("unreachable: the last attempt loads nothing")

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **gen_kwargs: Any) -> Any:
        """model.generate with the stored prefix loaded; same return value as generate on input_ids.

        With a batch whose rows hit the store unequally, generate runs on a wider input (each row's
        cached and computed columns aligned, padding between them): max_length and min_length are
        counted over `input_ids` all the same, but logits processors that read the prompt
        (repetition_penalty, no_repeat_ngram_size) also see that padding."""
        if self.cache_kwarg in gen_kwargs or "past_key_values" in gen_kwargs or "cache" in gen_kwargs:
            raise ValueError("kvtier_generate brings its own cache; do not pass one")
        _refuse_unkeyed_inputs(gen_kwargs)
        if input_ids.dim() == 2 and input_ids.shape[0] == 0:
            raise ValueError("generate of an empty batch (input_ids has 0 rows)")
        if input_ids.shape[1] == 0:  # transformers cannot run an empty prompt; start from BOS as generate() does
            bos = self.model.generation_config.bos_token_id
            if bos is None:
                raise ValueError("empty prompt and the model has no bos_token_id to start from")
            input_ids = torch.full((input_ids.shape[0], 1), int(bos), dtype=torch.long)
            attention_mask = None
        cache = self.new_cache()
        caps = None
        for attempt in range(MAX_ATTEMPTS):
            if attempt == MAX_ATTEMPTS - 1:
                caps = [0] * input_ids.shape[0]
            plan = cache.prepare(input_ids, attention_mask, max_chunks=caps, head=True)
            kwargs = dict(gen_kwargs)
            # always a mask: without one, generate() guesses it from pad_token_id and masks prompt
            # tokens that equal it, and that KV would be saved under the prompt's keys
            kwargs["attention_mask"] = (plan.attention_mask if plan.attention_mask is not None
                                        else torch.ones_like(plan.full_input_ids))
            if plan.full_input_ids.shape[1] != input_ids.shape[1]:
                _lengths_from_the_callers_prompt(kwargs, self.model.generation_config, input_ids.shape[1])
            try:
                head = self.run_head(cache, plan)
                out = self.model.generate(plan.full_input_ids, **self.cache_kwargs(cache), **kwargs)
                if head is not None:
                    head()
            except PrefixLoadError as e:
                caps = list(e.valid_chunks)
                continue
            except BaseException:
                cache.discard()  # as in prefill: nothing stays held until a garbage-collection pass
                raise
            return _restore_prompt(out, input_ids, plan)
        raise AssertionError("unreachable: the last attempt loads nothing")

    # -- accounting (thread-safe: save callbacks run on the store's writer thread) ------------------
    def record_prefill(self, plan: PrefillPlan, load_seconds: float) -> None:
        self.metrics.inc(m.HIT_TOKENS, float(sum(plan.cached_tokens)), connector=CONNECTOR)
        self.metrics.inc(PREFILL_TOKENS, float(sum(plan.prompt_tokens)), connector=CONNECTOR)
        self.metrics.inc(m.COMPUTED_TOKENS, float(sum(plan.prompt_tokens) - sum(plan.cached_tokens)),
                         connector=CONNECTOR)
        self.metrics.inc(m.LOAD_SECONDS, load_seconds, connector=CONNECTOR)
        self.metrics.observe(m.CONNECTOR_LOAD_TIME, load_seconds, connector=CONNECTOR)

    def add_save_seconds(self, seconds: float) -> None:
        self.metrics.inc(m.SAVE_SECONDS, seconds, connector=CONNECTOR)
        self.metrics.observe(m.CONNECTOR_SAVE_TIME, seconds, connector=CONNECTOR)

    def report_load_failure(self, chunks: int, reason: str) -> None:
        self.metrics.inc(m.LOAD_FAILURES, float(chunks), connector=CONNECTOR)
        self._log_once("load", "kvtier: could not load stored KV (%s); recomputing those tokens. "
                       "Further load failures are counted in %s, not logged.", reason, m.LOAD_FAILURES)

    def report_save_failure(self, chunks: int, reason: str) -> None:
        self.metrics.inc(SAVE_FAILURES, float(chunks), connector=CONNECTOR)
        self._log_once("save", "kvtier: could not store %d chunks of KV (%s); generation is unaffected. "
                       "Further save failures are counted in %s, not logged.", chunks, reason, SAVE_FAILURES)

    def watch_save(self, handle: Any, chunks: int) -> None:
        def done(h: Any) -> None:
            exc = h.exception()
            if exc is not None:
                self.report_save_failure(chunks, f"{type(exc).__name__}: {exc}")
                return
            r = h.wait()
            stored = max(r.in_memory, r.on_disk)
            if stored < r.chunks:
                self.report_save_failure(r.chunks - stored, "no room in any tier")

        handle.add_done_callback(done)

    def _log_once(self, kind: str, msg: str, *args: Any) -> None:
        with self._lock:
            if kind in self._logged:
                return
            self._logged.add(kind)
        log.warning(msg, *args)


# inputs beside the token ids that change the KV (images, audio, embeddings given for the ids):
# kvtier's keys are computed from the token ids alone, so such requests are refused, not keyed wrong
_UNKEYED_INPUTS = ("inputs_embeds", "input_features", "input_values")
_UNKEYED_PREFIXES = ("pixel_", "image_", "video_", "audio_")


def _refuse_unkeyed_inputs(kwargs: dict[str, Any]) -> None:
    bad = sorted(k for k, v in kwargs.items() if v is not None
                 and (k in _UNKEYED_INPUTS or k.startswith(_UNKEYED_PREFIXES)))
    if bad:
        raise UnsupportedModelError(
            f"kvtier keys a prompt's KV by its token ids alone, and {', '.join(bad)} change that KV too: "
            "multimodal and embedding inputs are not supported (run the model without kvtier for them)")


def kvtier_generate(model: Any, input_ids: torch.Tensor, store: Any,
                    attention_mask: torch.Tensor | None = None, *, tenant_salt: str = "", **gen_kwargs: Any) -> Any:
    """`model.generate(input_ids, **gen_kwargs)` with the stored prefix of each row loaded from `store`.

    `store` is a TransformersConnector (reuse one: building it hashes the weights), a
    TieredStore or a StoreClient. Left-padded batches of different lengths are fine; beam
    search and num_return_sequences > 1 are not supported.
    """
    conn = store if isinstance(store, TransformersConnector) else TransformersConnector(model, store,
                                                                                       tenant_salt=tenant_salt)
    if conn.model is not model:
        raise ValueError("the connector was built for another model")
    return conn.generate(input_ids, attention_mask, **gen_kwargs)


def _lengths_from_the_callers_prompt(kwargs: dict[str, Any], default: Any, width: int) -> None:
    """generate runs on the plan's input, wider than the caller's (rows' cached and uncached columns
    aligned), and transformers counts max_length and min_length over the input it runs: they become
    max_new_tokens and min_new_tokens over the caller's width, as model.generate would count them."""
    config = kwargs.get("generation_config") or default
    if kwargs.get("max_new_tokens") is None and getattr(config, "max_new_tokens", None) is None:
        max_length = kwargs.pop("max_length", None)
        if max_length is None:
            max_length = getattr(config, "max_length", None)
        if max_length is not None:
            if max_length <= width:
                raise ValueError(f"Input length of input_ids is {width}, but `max_length` is set to {max_length}: "
                                 "increase `max_length` or set `max_new_tokens`")
            kwargs["max_new_tokens"] = max_length - width
    if kwargs.get("min_new_tokens") is None:
        min_length = kwargs.pop("min_length", None)
        if min_length is None:
            min_length = getattr(config, "min_length", None)
        if min_length:
            kwargs["min_new_tokens"] = max(0, min_length - width)


def _restore_prompt(out: Any, input_ids: torch.Tensor, plan: PrefillPlan) -> Any:
    """generate ran on plan.full_input_ids; give back the caller's prompt followed by the new tokens."""
    width = plan.full_input_ids.shape[1]

    def fix(seq: torch.Tensor) -> torch.Tensor:
        return torch.cat([input_ids.to(seq.device, seq.dtype), seq[:, width:]], dim=1)

    if isinstance(out, torch.Tensor):
        return fix(out)
    if getattr(out, "sequences", None) is not None:
        out.sequences = fix(out.sequences)
    return out
