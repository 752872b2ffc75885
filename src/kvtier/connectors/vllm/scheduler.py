"""Scheduler side of the vLLM connector (EngineCore process), free of vLLM imports.

Called by KVTierConnector's scheduler-role methods:

    num_new_matched_tokens(request, num_computed)  store lookup with a lease -> loadable tokens
    after_alloc(request, block_ids, num_external)  turn the lease into a load of those blocks
    build_plan(scheduled, block_ids_of, spec)      this step's loads and saves (StepPlan)
    request_finished(request)                      drop the request; release an unshipped lease;
                                                   a producer's handoff for the decode instance (pd.py),
                                                   once its chunks are in the lower tiers (wait_lower)
    load_errors(block_ids)                         chunks whose load failed will be saved again
    observe_compute(samples)                       the workers' timed forwards (tokens, seconds): the
                                                   load planner's compute cost per token

Never slower than recomputing (plan_loads): a lookup's hits are cut to the leading chunks the
load planner (store/planner.py) finds worth loading: a chunk from a tier below DRAM costs
chunk_bytes / that tier's read bandwidth (the store's own measure, asked for at most every
BANDWIDTH_REFRESH_S), computing it chunk_tokens x the engine's cost per token (from the
workers); DRAM hits always load, and without a compute estimate or a bandwidth every hit loads.
The chunks cut are computed by vLLM and saved again (into DRAM, where the next request finds
them); they are trimmed from the lease at once (or the lease released, when nothing is worth
loading), so their disk promotions not started never read.

A chunk is chunk_tokens tokens, a divisor of vLLM's block_size: chunk i of a request sits
in its block i // (block_size // chunk_tokens) at token offset (i % ...) * chunk_tokens.
Each request's keys are a KeyChain built once from its prompt (extended with generated
tokens only when save_decode is on). External hits are whole chunks after vLLM's own
(block-aligned) hit and never include the prompt's last token, which must be computed
for its logits; with chunks smaller than a block a hit may end inside a block.
The chunk holding the last token is loaded whole when stored, and counted as a hit of all
its tokens but the last (vLLM computes that token again, overwriting its loaded row): a
prompt of whole chunks hits all but one token. With partial_chunks (the default) the
prompt's partial last chunk (2 or more tokens past its last whole chunk) is saved too, under
KeyChain.partial_key, with zeros after its tokens: an exact repeat of any prompt then hits
every token but the last (a longer or different prompt never matches it). vLLM 0.32
handles that: it allocates the partly loaded block (cdiv), computes the rest of it in the
same step, and registers a block in its prefix cache only once all its tokens are
scheduled (cache_blocks counts whole blocks of computed + scheduled tokens), and a load
error rolls num_computed_tokens back to the start of the failed block.

Leases: a lookup leases the hit chunks so they stay in DRAM until the worker loads them.
A repeated lookup for the same request (vLLM may ask again when allocation failed)
releases the previous lease first. Once a load is shipped in a plan the worker owns the
lease and releases it after loading; if the request ends before that, the scheduler
releases it. From after_alloc until the worker has released it (or the request finished),
the lease is renewed (leases.py: one batched call per step for the leases past half their
lease_s, and from a thread while vLLM waits for a long step), so a load that starts long
after its lookup (async scheduling behind a long step, pipeline parallelism) still finds
its chunks. A lease lost anyway (the store restarted, a load planned MAX_HOLD_S ago) only
means the load may find chunks gone: loads read by key, so the worker reports exactly those
blocks, zeroed, and vLLM recomputes them (kv_load_failure_policy=recompute); never another
chunk's KV.

Saves: a chunk is saved in the step whose forward pass completes its KV (after chunked
prefill, or right away; also when the rest of its block is not computed yet), except chunks vLLM already had cached or loaded from kvtier.
Saves are copied into the store's DRAM within that step, so request_finished never has
to hold blocks (it returns False) and preemption needs no extra work.
Requests with multimodal inputs or prompt embeddings get no hits and save nothing:
their token ids do not identify their KV.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kvtier.client.api import StoreClient
from kvtier.connectors.vllm.leases import LeaseKeeper
from kvtier.connectors.vllm.link import StoreLink
from kvtier.connectors.vllm.pd import Handoff, HandoffError, Identity, asks_for_handoff, prompt_digest
from kvtier.connectors.vllm.plan import LoadSpec, SaveSpec, StepPlan
from kvtier.core.codec import encode_block_hashes
from kvtier.core.errors import KVTierError
from kvtier.core.keys import KeyChain
from kvtier.service.protocol import LeaseError
from kvtier.store.planner import ESTIMATES, CostEstimates, chunks_worth_loading

log = logging.getLogger("kvtier.connectors.vllm")

RootFor = Callable[[str, str], bytes]  # (cache_salt, lora_key(request)) -> namespace root key
BANDWIDTH_REFRESH_S = 5.0  # the load planner asks the store for its tiers' read bandwidths at most this often


@dataclass(slots=True)
class _Lease:
    lease_id: int | None
    start: int  # first leased chunk
    hits: int  # leased chunks (the final chunk included)
    tiers: tuple[str, ...] = ()  # where each leased chunk was found
    final_key: bytes | None = None  # the chunk holding the prompt's last token, when leased
    final_tokens: int = 0  # tokens of it the hit claims (all but the last token)
    final_partial: bool = False  # the final chunk is the prompt's partial chunk
    taken_at: float = 0.0  # the lookup that took it (the scheduler's clock): it lasts lease_s from there


@dataclass(slots=True)
class _ReqState:
    request: Any
    chain: KeyChain | None  # None: the request's KV is not identified by its tokens
    lease: _Lease | None = None
    stored_upto: int = 0  # chunks [0, stored_upto) are in vLLM's cache from the store, or saved
    local_tokens: int = 0  # vLLM's own block-aligned hit at the last lookup
    load: LoadSpec | None = None  # decided in after_alloc, shipped by build_plan
    load_start: int = 0  # chunk index of load.keys[0]
    loaded: dict[int, int] = field(default_factory=dict)  # block id -> first chunk index of shipped loads
    partial: bytes | None = None  # key of the prompt's partial last chunk (2..chunk_tokens-1 tokens)
    partial_tokens: int = 0
    partial_stored: bool = False  # in the store: saved by this request or loaded from it
    prompt_tokens: int = 0  # the prompt length the chain and partial chunk were keyed for
    handoff_checked: bool = False  # its kv_transfer_params were read (consumer)
    awaited: frozenset[bytes] = frozenset()  # chunks a producer published that the store must show first
    refused: HandoffError | None = None  # the handoff its kv_transfer_params carried, refused (consumer)
    wait_until: float = 0.0  # ... until then; afterwards whatever is there is loaded, the rest computed
    next_poll: float = 0.0


def lora_name(request: Any) -> str:
    lora = getattr(request, "lora_request", None)
    return str(getattr(lora, "lora_name", "") or "") if lora is not None else ""


def lora_key(request: Any) -> str:
    """The LoRA adapter a request's KV depends on, for its namespace: "" for none, else its name and
    path ("name\npath"; the connector identifies the weights there). vLLM's own block hashes key
    an adapter by name and path too; by name alone, two adapters of one name shared their KV."""
    lora = getattr(request, "lora_request", None)
    if lora is None:
        return ""
    return f"{lora_name(request)}\n{getattr(lora, 'lora_path', '') or ''}"


def keyable(request: Any) -> bool:
    """True when token ids alone identify the request's KV (no images, audio or embeddings)."""
    if getattr(request, "prompt_token_ids", None) is None:
        return False
    if getattr(request, "prompt_embeds", None) is not None:
        return False
    return not getattr(request, "mm_features", None)


@dataclass(slots=True, frozen=True)
class SavedBlock:
    """One vLLM block this instance saved into the store (a BlockStored for take_events)."""

    block_hash: int | bytes
    parent: int | bytes | None
    token_ids: list[int]
    lora_name: str


class SchedulerSide:
    def __init__(self, link: StoreLink, root_for: RootFor, chunk_tokens: int, hash_mode: str,
                 save_decode: bool = False, *, load: bool = True, save: bool = True,
                 block_size: int | None = None, partial_chunks: bool = True, identity: Identity | None = None,
                 remote_wait_s: float = 10.0, poll_s: float = 0.02, publish_wait_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, chunk_bytes: int = 0, plan_loads: bool = True,
                 estimates: CostEstimates | None = None, engine_id: str = "vllm", lease_s: float = 30.0) -> None:
        """`lease_s`: how long the client's leases last (its lease_timeout_s); planned loads' leases
        are renewed before that (self.leases)."""
        block_size = chunk_tokens if block_size is None else block_size
        if chunk_tokens <= 0 or block_size % chunk_tokens:
            raise ValueError(f"chunk_tokens {chunk_tokens} must divide vLLM's block_size {block_size}")
        self.block_size = block_size
        self.chunks_per_block = block_size // chunk_tokens
        self.link = link
        self.load = load  # kv_role kv_consumer / kv_both
        self.save = save  # kv_role kv_producer / kv_both
        self.root_for = root_for
        self.chunk_tokens = chunk_tokens
        self.hash_mode = hash_mode
        self.save_decode = save_decode
        self.partial_chunks = partial_chunks
        self.load_failures_seen = 0
        self._recent_saves: list[list[tuple[str, int, bool]]] = []  # the last two plans' saves (load_errors)
        self.identity = identity  # for handoffs (pd.py); None: this side neither makes nor accepts them
        self.remote_wait_s = remote_wait_s
        self.poll_s = poll_s
        self.publish_wait_s = publish_wait_s  # producer: bound on waiting for a handoff's lower-tier writes
        self.clock = clock
        self.leases = LeaseKeeper(link, lease_s, clock)  # keeps planned loads' leases alive until loaded
        self.reqs: dict[str, _ReqState] = {}
        self.stats = {"lookups": 0, "hit_chunks": 0, "loaded_chunks": 0, "saved_chunks": 0,
                      "saved_partial_chunks": 0, "store_errors": 0, "handoffs_made": 0, "handoffs_received": 0,
                      "handoff_chunks_missing": 0,
                      "handoffs_rejected": 0, "handoff_timeouts": 0, "handoff_wait_polls": 0,
                      "handoff_publish_waits": 0, "handoff_publish_timeouts": 0, "handoff_publish_wait_ms": 0,
                      # the load planner: hit chunks it left to vLLM to compute; forwards the workers timed
                      "planner_recomputed_chunks": 0, "compute_samples": 0}
        # vLLM's block hash -> the int or bytes its KV events publish (maybe_convert_block_hash);
        # None: chunks are saved without SECTION_BLOCK_HASHES (their events carry kvtier's keys)
        self.convert_hash: Callable[[Any], int | bytes] | None = None
        self.saved_blocks: list[SavedBlock] = []
        self.loaded_by_tier: dict[str, int] = {}  # chunks planned for loading, by the tier that held them
        self.loaded_tokens_by_tier: dict[str, int] = {}  # the tokens those chunks count for
        # the load planner (never slower than recomputing): chunk_bytes 0 or plan_loads False loads every hit
        self.chunk_bytes = chunk_bytes
        self.plan_loads = plan_loads and chunk_bytes > 0
        self.estimates = estimates if estimates is not None else ESTIMATES
        self.engine_id = engine_id
        self._bandwidths_at = -float("inf")  # when the tiers' read bandwidths were last asked of the store

    # -- helpers -------------------------------------------------------------------------
    def _state(self, request: Any) -> _ReqState:
        st = self.reqs.get(request.request_id)
        if st is None:
            st = self.reqs[request.request_id] = _ReqState(request, None)
            self._key_prompt(st)
        else:
            self._rekey_if_grown(st)
        return st

    def _rekey_if_grown(self, st: _ReqState) -> None:
        if st.request.num_prompt_tokens != st.prompt_tokens:
            self._key_prompt(st)  # a streaming session's next input: its prompt grew

    def _key_prompt(self, st: _ReqState) -> None:
        """Key the request's prompt (its chain, its partial last chunk). Again when vLLM grows a
        streaming session's prompt in place (same request id: the computed outputs and the new
        input appended, the last sampled token discarded): the chain may hold that discarded token
        and the partial chunk was the old prompt's, so both are made anew, and what was stored
        counts only as far as the new chain agrees with the old."""
        request, old = st.request, st.chain
        st.prompt_tokens = request.num_prompt_tokens
        st.chain, st.partial, st.partial_tokens, st.partial_stored = None, None, 0, False
        if not keyable(request):
            return
        root = self.root_for(getattr(request, "cache_salt", None) or "", lora_key(request))
        chain = st.chain = KeyChain(root, self.chunk_tokens, self.hash_mode)
        chain.extend(list(request.prompt_token_ids))
        if old is not None:
            same = next((i for i, (a, b) in enumerate(zip(old.keys, chain.keys, strict=False)) if a != b),
                        min(len(old.keys), len(chain.keys)))
            st.stored_upto = min(st.stored_upto, same)
        tail = request.num_prompt_tokens % self.chunk_tokens
        if self.partial_chunks and tail >= 2:  # 1 token: nothing to load
            st.partial, st.partial_tokens = chain.partial_key(), tail

    def rekey_all(self) -> None:
        """The namespace changed (KVTierConnector.reset_cache: vLLM was told to forget the connector's
        cache, as after a weight update): every request in flight is keyed anew under the new root, and
        what it had stored or loaded counts for nothing there (vLLM resets its prefix cache only with
        no request running, or with every running one preempted and recomputed)."""
        for st in self.reqs.values():
            self._key_prompt(st)
            st.stored_upto = 0
            st.partial_stored = False
        self._recent_saves.clear()

    def _final_chunk(self, st: _ReqState, num_tokens: int, end: int) -> tuple[bytes, int, bool] | None:
        """(key, tokens to claim, partial?) of chunk `end` when it holds the request's last token.

        Loading it whole and claiming all its tokens but the last lets a repeated prompt hit every
        token but the one vLLM must compute; that token's row is computed again over the loaded one
        (the rows after it are never read before they are written).
        """
        c, chain = self.chunk_tokens, st.chain
        assert chain is not None
        if (end + 1) * c == num_tokens and end < len(chain.keys) and c >= 2:
            return chain.keys[end], c - 1, False
        if (st.partial is not None and num_tokens == st.request.num_prompt_tokens
                and end * c + st.partial_tokens == num_tokens):
            return st.partial, st.partial_tokens - 1, True
        return None

    def _call(self, fn: Callable[[StoreClient], Any]) -> Any:
        client = self.link.client()
        if client is None:
            return None
        try:
            return fn(client)
        except LeaseError:
            return None
        except (KVTierError, OSError) as e:
            self.stats["store_errors"] += 1
            self.link.failed(e)
            return None

    def _places(self, block_ids: Sequence[int], first: int, end: int) -> tuple[list[int], list[int]]:
        """(block id, token offset in it) of chunks [first, end), from the request's block ids."""
        r, c = self.chunks_per_block, self.chunk_tokens
        if r == 1:
            return list(block_ids[first:end]), [0] * (end - first)
        return [block_ids[i // r] for i in range(first, end)], [(i % r) * c for i in range(first, end)]

    def _release(self, st: _ReqState) -> None:
        if st.lease is not None and st.lease.lease_id is not None:
            lease_id = st.lease.lease_id
            self._call(lambda c: c.release(lease_id))
        st.lease = None

    def _extend_chain(self, st: _ReqState, upto: int) -> None:
        chain = st.chain
        assert chain is not None
        if self.save_decode and upto > chain.num_tokens:
            tokens = st.request.all_token_ids
            chain.extend(list(tokens[chain.num_tokens:upto]))

    # -- vLLM's scheduler calls ------------------------------------------------------------
    def _accept_handoff(self, st: _ReqState) -> None:
        """Read a producer's handoff from the request's kv_transfer_params, once: the chunks to wait for.

        A malformed handoff, or one made for another model, layout, format or prompt, is refused
        with a warning naming the difference: the request then only gets what the store holds
        under its own keys (and recomputes the rest).
        """
        st.handoff_checked = True
        params = getattr(st.request, "kv_transfer_params", None)
        if not params or st.chain is None:
            return
        req_id = st.request.request_id
        try:
            handoff = Handoff.from_params(params)
            if handoff is None:
                return
            if self.identity is None:
                raise HandoffError("this instance was not given its identity; it cannot check handoffs", "identity")
            diff = self.identity.mismatch(handoff.identity)
            if diff:
                raise HandoffError(f"made for another model or layout: {diff}", "identity")
            chain = st.chain
            prompt = st.request.prompt_token_ids
            if handoff.prompt_tokens >= 0 and (handoff.prompt_tokens != len(prompt) or handoff.prompt_digest
                                               != prompt_digest(chain.root, prompt)):
                raise HandoffError(f"it was made for another prompt ({handoff.prompt_tokens} tokens; this one has "
                                   f"{len(prompt)}{' and differs' if handoff.prompt_tokens == len(prompt) else ''})",
                                   "prompt")
            if handoff.chunks > len(chain.keys) or (handoff.partial_tokens and (
                    handoff.partial_tokens != st.partial_tokens or handoff.chunks != len(chain.keys))):
                raise HandoffError(f"it names {handoff.chunks} chunks + {handoff.partial_tokens} tokens, more than "
                                   f"or other than this prompt's {st.request.num_prompt_tokens} tokens", "prompt")
            published: list[bytes] = list(chain.keys[:handoff.chunks])
            if handoff.partial_tokens:
                if st.partial is None:
                    raise HandoffError("it names a partial chunk, but this instance saves no partial chunks "
                                       "(partial_chunks differs between the two instances)", "identity")
                published.append(st.partial)
            if published and published[-1].hex() != handoff.last_key:
                raise HandoffError("its last_key is not this prompt's key (another prompt, cache salt or adapter)",
                                   "prompt")
        except HandoffError as e:
            self.stats["handoffs_rejected"] += 1
            st.refused = e
            # another model or layout is the deployment's error, not this request's: an error, not a warning
            log.log(logging.ERROR if e.kind == "identity" else logging.WARNING, "kvtier: request %s: kv_transfer_params refused (it loads only what the store holds under its own keys, computes the rest): %s", req_id, e)
            return
        self.stats["handoffs_received"] += 1
        st.awaited = frozenset(published)
        st.wait_until = self.clock() + self.remote_wait_s

    def _awaited_hits(self, st: _ReqState, keys: Sequence[bytes]) -> int:
        """How many leading `keys` the producer published: the hits to wait for."""
        n = 0
        while n < len(keys) and keys[n] in st.awaited:
            n += 1
        return n

    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> int | None:
        """Tokens after vLLM's own hit that the store can supply (whole chunks, never the last token).

        None (vLLM asks again next step) while a producer's handoff is not in the store yet.
        """
        st = self._state(request)
        self._release(st)  # a repeated call replaces the previous lease
        st.local_tokens = num_computed_tokens
        if st.chain is None or not self.load:
            return 0
        if not st.handoff_checked:
            self._accept_handoff(st)
        if st.awaited and self.clock() < st.next_poll:
            return None  # waiting for the producer's chunks; do not poll the store every scheduler pass
        c = self.chunk_tokens
        start = num_computed_tokens // c
        if num_computed_tokens % c:
            return 0  # vLLM passes block-aligned hits; anything else is not ours to extend
        self._extend_chain(st, request.num_tokens)
        end = min((request.num_tokens - 1) // c, len(st.chain.keys))
        final = self._final_chunk(st, request.num_tokens, end) if end >= start else None
        if end <= start and final is None:
            return 0
        keys = st.chain.keys[start:end] + ([final[0]] if final else [])
        taken_at = self.clock()
        reply = self._call(lambda cl: cl.lookup(keys, lease=True))
        self.stats["lookups"] += 1
        if st.awaited and (reply.hits if reply is not None else 0) < self._awaited_hits(st, keys):
            now = self.clock()
            if now < st.wait_until:
                if reply is not None and reply.lease_id is not None:
                    lease_id = reply.lease_id
                    self._call(lambda c: c.release(lease_id))
                self.stats["handoff_wait_polls"] += 1
                st.next_poll = now + self.poll_s
                return None
            self.stats["handoff_timeouts"] += 1
            log.warning("kvtier: request %s: %d of the %d chunks its producer published are in the store after "
                        "%.1f s; loading those, computing the rest", request.request_id,
                        reply.hits if reply is not None else 0, len(st.awaited), self.remote_wait_s)
        st.awaited = frozenset()
        if reply is None or reply.hits == 0:
            return 0
        st.lease = _Lease(reply.lease_id, start, reply.hits, tuple(reply.tiers), taken_at=taken_at)
        self.stats["hit_chunks"] += reply.hits
        worth = self._worth_loading(tuple(reply.tiers[:reply.hits]))
        if worth < reply.hits:  # loading the rest is estimated slower than computing it: vLLM computes it
            self.stats["planner_recomputed_chunks"] += reply.hits - worth
            if worth == 0:
                self._release(st)
                return 0
            # the lease drops the rest: their disk promotions stop taking reads from loads that pay
            lease_id, cut = reply.lease_id, keys[worth:reply.hits]
            if lease_id is not None:
                self._call(lambda cl: cl.trim(lease_id, cut))
            st.lease = _Lease(lease_id, start, worth, tuple(reply.tiers[:worth]), taken_at=taken_at)
            return worth * c
        if final is not None and reply.hits == len(keys):  # every chunk, the final one too
            st.lease.final_key, st.lease.final_tokens, st.lease.final_partial = final
            return (reply.hits - 1) * c + final[1]
        return reply.hits * c

    # -- the load planner ----------------------------------------------------------------
    def tier_id(self, tier: str) -> str:
        return f"vllm-store:{tier}"

    def observe_compute(self, samples: Sequence[tuple[int, float]]) -> None:
        """(tokens, seconds) of the workers' forwards without loads: the compute cost per token."""
        for tokens, seconds in samples:
            self.estimates.observe_compute(self.engine_id, int(tokens), float(seconds))
            self.stats["compute_samples"] += 1

    def _refresh_bandwidths(self) -> None:
        """The store's measured read bandwidth of each tier below DRAM (at most every
        BANDWIDTH_REFRESH_S): disk, shared folder, Redis. DRAM hits are always loaded: the worker
        copies them itself, at host memory or PCIe speed, which no measure of the store's sees and
        which beat recomputing on every machine measured (CPU and H200)."""
        now = self.clock()
        if now - self._bandwidths_at < BANDWIDTH_REFRESH_S:
            return
        self._bandwidths_at = now
        stats = self._call(lambda c: c.stats())
        if not isinstance(stats, Mapping):
            return
        for name, tier in stats.items():
            gbps = tier.get("read_gbps") if isinstance(tier, Mapping) and name != "memory" else None
            if isinstance(gbps, (int, float)) and not isinstance(gbps, bool) and gbps > 0:
                self.estimates.seed_bandwidth(self.tier_id(str(name)), float(gbps) * 1e9, 1.0, source="store")

    def _worth_loading(self, tiers: tuple[str, ...]) -> int:
        """Leading hit chunks whose loading is estimated faster than computing them (all of them
        without a compute estimate, or with the planner off)."""
        if not self.plan_loads or all(t == "memory" for t in tiers):
            return len(tiers)
        spt = self.estimates.seconds_per_token(self.engine_id)
        if spt is None:
            return len(tiers)
        self._refresh_bandwidths()
        bandwidths = {t: None if t == "memory" else self.estimates.bandwidth(self.tier_id(t)) for t in set(tiers)}
        return chunks_worth_loading(tiers, self.chunk_bytes, self.chunk_tokens, bandwidths, spt)

    def after_alloc(self, request: Any, block_ids: Sequence[int], num_external_tokens: int) -> None:
        st = self.reqs.get(request.request_id)
        if st is None:
            return
        lease = st.lease
        self._count_local_stored(st)
        if num_external_tokens <= 0 or lease is None or st.chain is None:
            self._release(st)
            return
        whole = lease.hits - (lease.final_key is not None)
        n = min(num_external_tokens // self.chunk_tokens, whole)
        final = lease.final_key is not None and num_external_tokens == whole * self.chunk_tokens + lease.final_tokens
        start = lease.start
        blocks, offsets = self._places(block_ids, start, start + n + final)
        keys: list[bytes] = list(st.chain.keys[start:start + n])
        if final and lease.final_key is not None:
            keys.append(lease.final_key)
        st.load = LoadSpec(request.request_id, keys, blocks, offsets, lease.lease_id)
        st.load_start = start
        if lease.lease_id is not None:  # kept alive until the worker has loaded and released it
            self.leases.hold(request.request_id, lease.lease_id, lease.taken_at)
        for i, tier in enumerate(lease.tiers[:n + final]):
            self.loaded_by_tier[tier] = self.loaded_by_tier.get(tier, 0) + 1
            tokens = lease.final_tokens if i == n else self.chunk_tokens
            self.loaded_tokens_by_tier[tier] = self.loaded_tokens_by_tier.get(tier, 0) + tokens
        st.lease = None  # handed to the load; shipped by build_plan
        if st.stored_upto >= start:  # else the save from stored_upto covers vLLM's chunks the store lost
            st.stored_upto = max(st.stored_upto, start + n + (final and not lease.final_partial))
        st.partial_stored = st.partial_stored or (final and lease.final_partial)

    def _count_local_stored(self, st: _ReqState) -> None:
        """Chunks vLLM had cached (its own prefix hit) count as stored only as far as the store
        holds them: they were saved when computed, unless the store was down or full then, or
        evicted them since (its lookups start after vLLM's hit, so nothing kept them fresh
        there). Those it lost are saved again from vLLM's blocks (build_plan). The lookup
        touches the rest, so a prefix hot in vLLM's cache stays in the store for other engines."""
        local = st.local_tokens // self.chunk_tokens
        if not self.save or st.chain is None or local <= st.stored_upto:
            return
        keys = st.chain.keys[st.stored_upto:local]
        reply = self._call(lambda cl: cl.lookup(keys))
        if reply is not None:
            st.stored_upto += reply.hits

    def build_plan(self, num_scheduled: Mapping[str, int], block_ids_of: Callable[[str], Sequence[int] | None],
                   spec_tokens: Mapping[str, Sequence[int]] | None = None) -> StepPlan:
        plan = StepPlan(load_failures_seen=self.load_failures_seen)
        self.leases.renew_due()  # the leases of loads planned in earlier steps and not made yet
        for pending in self.reqs.values():
            if pending.load is not None:
                plan.loads.append(pending.load)
                pending.loaded = {}
                for i, b in enumerate(pending.load.block_ids):
                    pending.loaded.setdefault(b, pending.load_start + i)
                self.stats["loaded_chunks"] += len(pending.load.keys)
                pending.load = None
        c = self.chunk_tokens
        saved: list[tuple[str, int, bool]] = []  # (request, first chunk saved, a partial chunk)
        for req_id, n_sched in num_scheduled.items() if self.save else ():
            st = self.reqs.get(req_id)
            if st is not None:
                self._rekey_if_grown(st)  # a session resumed with its blocks: vLLM asked no lookup
            if st is None or st.chain is None:
                continue
            req = st.request
            n_spec = len(spec_tokens.get(req_id, ())) if spec_tokens else 0
            computed_after = req.num_computed_tokens + n_sched - n_spec
            limit = computed_after if self.save_decode else min(computed_after, req.num_prompt_tokens)
            self._extend_chain(st, limit)
            done = min(limit // c, len(st.chain.keys))
            partial = st.partial is not None and not st.partial_stored and computed_after >= req.num_prompt_tokens
            if done <= st.stored_upto and not partial:
                continue
            blocks = block_ids_of(req_id)
            if blocks is None:
                continue
            if st.stored_upto < done <= len(blocks) * self.chunks_per_block:
                first = st.stored_upto
                keys = st.chain.keys
                parent = keys[first - 1] if first else st.chain.root
                block_ids, offsets = self._places(blocks, first, done)
                plan.saves.append(SaveSpec(req_id, list(keys[first:done]), block_ids, offsets, parent, first,
                                           block_hashes=self._block_hash_sections(st, first, done)))
                saved.append((req_id, first, False))
                self.stats["saved_chunks"] += done - first
                st.stored_upto = done
            if partial and self._save_partial(st, plan, blocks):
                saved.append((req_id, 0, True))
        # the worker drops a step's saves when a load failed in it, or in the step before when this
        # plan was made before the scheduler heard of that (load_errors rewinds both plans' requests)
        self._recent_saves = [self._recent_saves[-1], saved] if self._recent_saves else [saved]
        return plan

    def _block_hash_sections(self, st: _ReqState, first: int, done: int) -> list[bytes] | None:
        """SECTION_BLOCK_HASHES payloads of chunks [first, done) from vLLM's hashes of the request's
        blocks (`request.block_hashes`, as its KV events publish them: `convert_hash`), and record
        them for take_events; None when a chunk is not one whole block or the hashes are missing."""
        hashes = getattr(st.request, "block_hashes", None)
        if self.chunks_per_block != 1 or self.convert_hash is None or hashes is None or len(hashes) < done:
            return None
        convert = self.convert_hash
        out = []
        parent = convert(hashes[first - 1]) if first else None
        tokens = st.request.all_token_ids if self.save_decode else st.request.prompt_token_ids
        c = self.chunk_tokens
        for i in range(first, done):
            h = convert(hashes[i])
            out.append(encode_block_hashes(parent, [h]))
            self.saved_blocks.append(SavedBlock(h, parent, list(tokens[i * c:(i + 1) * c]), lora_name(st.request)))
            parent = h
        return out

    def take_saved_blocks(self) -> list[SavedBlock]:
        """The blocks this instance saved since the last call (for the connector's take_events)."""
        out, self.saved_blocks = self.saved_blocks, []
        return out

    def _save_partial(self, st: _ReqState, plan: StepPlan, blocks: Sequence[int]) -> bool:
        """Save the prompt's partial last chunk once the prompt is computed and its parent is saved;
        whether it was planned."""
        assert st.chain is not None and st.partial is not None
        idx = st.request.num_prompt_tokens // self.chunk_tokens  # its chunk index
        if st.stored_upto < idx or len(blocks) * self.chunks_per_block <= idx:
            return False  # its parent is not in the store (a failed load is recomputed first)
        block_ids, offsets = self._places(blocks, idx, idx + 1)
        parent = st.chain.keys[idx - 1] if idx else st.chain.root
        plan.saves.append(SaveSpec(st.request.request_id, [st.partial], block_ids, offsets, parent, idx,
                                   last_valid=st.partial_tokens))
        self.stats["saved_partial_chunks"] += 1
        st.partial_stored = True
        return True

    def request_finished(self, request: Any) -> dict[str, Any] | None:
        """Forget the request; a producer returns the handoff the request asked for (pd.py), a consumer
        the refusal of the handoff it was given (HandoffError.to_params), else None."""
        gone = self.reqs.pop(request.request_id, None)
        if gone is None:
            return None
        st = gone
        self.leases.drop(request.request_id)  # its loads are made (or, aborted, no longer wanted)
        self._release(st)  # never shipped: ours to release (a shipped lease is the worker's)
        if st.load is not None and st.load.lease_id is not None:
            lease_id = st.load.lease_id
            self._call(lambda c: c.release(lease_id))
        if st.refused is not None:
            return st.refused.to_params()
        if not (self.save and self.identity is not None and st.chain is not None
                and asks_for_handoff(getattr(request, "kv_transfer_params", None))):
            return None
        if getattr(getattr(request, "status", None), "name", "") == "FINISHED_ABORTED":
            return None  # vLLM drops an aborted request's params: no handoff, no wait blocking the engine
        handoff, published = self._handoff(st)
        self._wait_published(request.request_id, published)
        return self._as_stored(handoff, published).to_params()

    def _as_stored(self, handoff: Handoff, published: list[bytes]) -> Handoff:
        """The handoff cut to the chunks the store holds now. stored_upto counts vLLM's own prefix
        hit and saves planned, not committed (a save dropped after a failed load, a store that lost
        the chunks or restarted): a consumer told of chunks that are not there waits remote_wait_s
        for them and then computes the prompt anyway."""
        if not published:
            return handoff
        reply = self._call(lambda c: c.lookup(published))
        hits = reply.hits if reply is not None else 0
        if hits == len(published):
            return handoff
        self.stats["handoff_chunks_missing"] += len(published) - hits
        whole = min(handoff.chunks, hits)
        return replace(handoff, chunks=whole, partial_tokens=0,
                       last_key=published[whole - 1].hex() if whole else "")

    def _handoff(self, st: _ReqState) -> tuple[Handoff, list[bytes]]:
        """What this request published, and those chunks' keys: its prompt's whole chunks saved so
        far, and its partial chunk.

        Saves were committed to the store's DRAM within the steps that computed them (worker.py),
        so everything counted here is in this host's DRAM when vLLM finishes the request; its
        lower tiers (where another host's decode instance finds it) are written in the background,
        which _wait_published waits for.
        """
        assert st.chain is not None and self.identity is not None
        whole = min(st.stored_upto, st.request.num_prompt_tokens // self.chunk_tokens, len(st.chain.keys))
        published: list[bytes] = list(st.chain.keys[:whole])
        partial = 0
        if st.partial is not None and st.partial_stored and whole == st.request.num_prompt_tokens // self.chunk_tokens:
            published.append(st.partial)
            partial = st.partial_tokens
        self.stats["handoffs_made"] += 1
        prompt = st.request.prompt_token_ids
        return Handoff(self.identity, whole, partial, published[-1].hex() if published else "",
                       len(prompt), prompt_digest(st.chain.root, prompt)), published

    def _wait_published(self, req_id: str, keys: list[bytes]) -> None:
        """Wait, up to publish_wait_s, until the store's lower tiers (shared folder, Redis) hold the
        chunks of a handoff: vLLM sends the prefill's answer, and so the proxy the decode request, only
        after this returns, so the decode instance finds them at once instead of waiting for them
        inside its own TTFT. It blocks this engine's scheduler loop meanwhile: the price of a handoff
        is paid in the prefill leg. Chunks still being written after the bound (or a store that is
        down) are left to the consumer's own bounded wait (remote_wait_s).
        """
        if not keys or self.publish_wait_s <= 0:
            return
        started = self.clock()
        pending = self._call(lambda c: c.wait_lower(keys, self.publish_wait_s))
        self.stats["handoff_publish_waits"] += 1
        self.stats["handoff_publish_wait_ms"] += round(1000 * (self.clock() - started))
        if pending:
            self.stats["handoff_publish_timeouts"] += 1
            log.warning("kvtier: request %s: %d of the %d chunks of its handoff are still being written to the "
                        "lower tiers after %.1f s; answering now (the decode instance waits for the rest)",
                        req_id, pending, len(keys), self.publish_wait_s)

    def load_errors(self, block_ids: set[int]) -> None:
        """The worker could not load these blocks: their chunks are not in the store (any more)."""
        if block_ids:
            self.load_failures_seen += 1  # one report per step that had failures (plan.load_failures_seen)
        for st in self.reqs.values():
            bad = [chunk for b, chunk in st.loaded.items() if b in block_ids]
            if bad:
                st.stored_upto = min(st.stored_upto, min(bad))
                st.partial_stored = False  # a failed partial chunk is saved again once recomputed
        if block_ids:  # the worker dropped these plans' saves: every request in them saves again
            for plan_saves in self._recent_saves:
                for req_id, first, partial in plan_saves:
                    saver = self.reqs.get(req_id)
                    if saver is None:
                        continue
                    if partial:
                        saver.partial_stored = False
                    else:
                        saver.stored_upto = min(saver.stored_upto, first)
            self._recent_saves = []
