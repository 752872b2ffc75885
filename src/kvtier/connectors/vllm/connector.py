"""KVTierConnector: kvtier as a vLLM KV connector (KVConnectorBase_V1, vLLM 0.32).

    vllm serve MODEL --block-size 32 --kv-transfer-config '{
        "kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.connectors.vllm",
        "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"store": {"memory": {"capacity_bytes": "8GiB"},
                                                "disk": {"root": "/nvme/kvtier"}}}}'

vLLM builds one instance in the EngineCore process (scheduler role, scheduler.py) and one
per Worker process (worker role, worker.py); both talk to the host's `kvtier serve`
(started on first use with `auto_start`), which shares the cache between vLLM processes
and keeps it across restarts. The plan (keys, block ids, lease ids, the step's token count)
travels from the scheduler to the workers in KVTierConnectorMetadata; the workers' timed
forwards come back in KVTierWorkerMetadata.

Decisions (see scheduler.py / worker.py for the details):
- chunk size: the store's chunk_tokens, vLLM's block_size or a divisor of it (chunks smaller
  than a block: CPU backend only, so hits can end inside a block); loads are synchronous and layer by layer (no
  WAITING_FOR_REMOTE_KVS state): one store load per request starts in start_load_kv and
  wait_for_layer_load(layer i) waits only for layer i, the copies running on CPUs the
  forward pass does not use (cpus_left_free); saves are copied into the store's DRAM in the step that
  computes them, so request_finished returns False: blocks are freed at once.
- prefill/decode disaggregation (pd.py): with kv_role "kv_producer" a request that asks
  ({"do_remote_decode": true} in kv_transfer_params) gets back, in its output's kv_transfer_params,
  what it published, once those chunks are written to the store's lower tiers (request_finished
  waits up to publish_wait_s); a "kv_consumer" given them waits (up to remote_wait_s) for those chunks.
- never slower than recomputing (plan_loads, on by default): the scheduler loads a hit from a tier
  below DRAM (disk, shared folder, Redis) only where that tier's read bandwidth, as the store
  measures it, moves a chunk faster than the engine computes its tokens; the compute cost comes
  from the workers, which time forwards without loads (CUDA events on a GPU) and report (tokens,
  seconds) through build_connector_worker_meta. DRAM hits are always loaded.
- requires_kv_delivery is False: kvtier is a best-effort cache, a dropped save is a miss.
- handle_preemptions does nothing: no save is pending when a step ends.
- kv_load_failure_policy must be "recompute" (checked at start; set
  "allow_fail_policy": true in the extra config to keep vLLM's "fail"), so a lost chunk
  costs a recompute, not a failed request.
- Keys: kvtier's chained digest in a namespace of (model fingerprint = HF config + dtypes +
  weight identity, KV layout, chunk byte format, cache_salt, LoRA adapter name).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from kvtier.client.api import StoreClient
from kvtier.connectors.vllm import version
from kvtier.connectors.vllm.config import VLLMConnectorConfig, load_connector_config
from kvtier.connectors.vllm.fingerprint import lora_extras, vllm_model_fingerprint
from kvtier.connectors.vllm.layouts import SUB_BLOCK_CPU_ISAS
from kvtier.connectors.vllm.link import StoreLink
from kvtier.connectors.vllm.model import ModelKV, cpu_amx_supported, format_tag, model_kv, predict_cpu_isa
from kvtier.connectors.vllm.pd import Identity
from kvtier.connectors.vllm.plan import StepPlan
from kvtier.connectors.vllm.scheduler import SchedulerSide
from kvtier.connectors.vllm.stats import KVTierConnectorStats, KVTierPromMetrics, StatsRecorder
from kvtier.connectors.vllm.worker import WorkerSide
from kvtier.core.config import ClientConfig
from kvtier.core.errors import ConfigError, TierUnavailableError
from kvtier.core.keys import Namespace
from kvtier.core.layout import KVLayout
from kvtier.service.shm import default_socket_path, open_beside, prepare_socket_dir

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvtier.connectors.vllm")
MAX_ROOTS = 4096  # namespace roots the scheduler keeps made, one per (cache_salt, LoRA) in use


@dataclass
class KVTierConnectorMetadata(KVConnectorMetadata):
    plan: StepPlan


@dataclass
class KVTierWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, each step: (tokens, seconds) of forwards without loads (the planner's
    compute cost); vLLM merges every worker's with `aggregate`."""

    compute: list[tuple[int, float]]

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, KVTierWorkerMetadata):
            return KVTierWorkerMetadata(self.compute + other.compute)
        return self


def write_service_config(path: str, layout: KVLayout, cfg: VLLMConnectorConfig, socket_path: str) -> None:
    """Write the auto-started service's config beside its socket: a new temporary file
    (O_EXCL, never through a planted symlink), then renamed over `path`."""
    data = {"layout": dataclasses.asdict(layout), "store": dataclasses.asdict(cfg.store), "socket_path": socket_path}
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.unlink(tmp)  # a leftover of this pid (or something planted under its name): never reused
    except FileNotFoundError:
        pass
    fd = open_beside(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def start_detached_service(socket_path: str, service_config: str, timeout_s: float) -> None:
    """Start `python -m kvtier.service` unless something answers on `socket_path`.

    The service is started through a short-lived intermediate process, so it is re-parented
    away from vLLM: vLLM's shutdown kills its processes' whole child trees, and the store
    must outlive the vLLM process that happened to start it (other engines share it, and a
    restarted vLLM finds its DRAM cache). A second starter loses the service's lock and exits.
    The service runs with --all-cpus: started from a vLLM CPU worker it would otherwise share
    the cores vLLM pinned that worker's compute threads to, and answer lookups late.
    """
    from kvtier.service.server import answers

    if answers(socket_path):
        return
    launcher = (
        "import subprocess, sys\n"
        "log = int(sys.argv[3])\n"
        "subprocess.Popen([sys.executable, '-m', 'kvtier.service', '--config', sys.argv[1], '--socket', sys.argv[2],"
        " '--all-cpus'],"
        " stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)\n"
    )
    log_fd = open_beside(socket_path + ".log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # never through a link
    try:
        subprocess.run([sys.executable, "-c", launcher, service_config, socket_path, str(log_fd)], check=True,
                       timeout=60, pass_fds=(log_fd,))
    finally:
        os.close(log_fd)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if answers(socket_path, timeout=1.0):
            return
        time.sleep(0.1)
    raise TierUnavailableError(f"started a kvtier service on {socket_path} but it did not answer within "
                               f"{timeout_s} s; see {socket_path}.log")


def cpus_left_free() -> tuple[int, ...]:
    """The machine's CPUs that the calling thread is not pinned to; () when it may run anywhere.

    vLLM's CPU worker pins its forward pass to its compute cores and keeps others free
    (VLLM_CPU_NUM_OF_RESERVED_CPU; vLLM reserves one more when a KV connector is set, for
    the connector's transfers, as its NIXL connector uses it). kvtier's transfer threads,
    started from the pinned worker thread, would otherwise copy on the cores of the forward
    pass, so a layer's load could not overlap the compute of the layers before it.
    """
    if not hasattr(os, "sched_getaffinity"):
        return ()
    mine = os.sched_getaffinity(0)
    return tuple(sorted(set(range(os.cpu_count() or 1)) - mine))


def open_client(cfg: VLLMConnectorConfig, layout: KVLayout, first: bool,
                transfer_cpus: tuple[int, ...] = ()) -> StoreClient:
    """A ServiceClient for this model's layout; at start it may launch the service."""
    from kvtier.client.service_client import ServiceClient

    chunk_tokens = cfg.store.chunk_tokens
    socket_path = cfg.socket_path or default_socket_path(layout, chunk_tokens)
    service_config = cfg.service_config
    auto_start = cfg.auto_start and first
    if auto_start:
        prepare_socket_dir(socket_path)  # the private folder the service config and log go into
    if auto_start and not service_config:
        service_config = socket_path + ".service.json"
        write_service_config(service_config, layout, cfg, socket_path)
    if auto_start:
        start_detached_service(socket_path, service_config, cfg.connect_timeout_s)
    client = ServiceClient(ClientConfig(mode="service", socket_path=socket_path, layout=layout,
                                        service_config=service_config, auto_start=False,
                                        lease_timeout_s=cfg.lease_timeout_s,
                                        connect_timeout_s=cfg.connect_timeout_s, transfer_cpus=transfer_cpus), layout)
    if client.chunk_tokens != chunk_tokens:
        client.close()
        raise ConfigError(f"the kvtier service on {socket_path} uses chunk_tokens={client.chunk_tokens}, but this "
                          f"connector's store.chunk_tokens is {chunk_tokens}; they must be equal")
    return client


def _setup_logging() -> None:
    logger = logging.getLogger("kvtier")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [kvtier pid %(process)d] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class KVTierConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        _setup_logging()
        version.check_installed()
        from vllm.platforms import current_platform

        ktc = self._kv_transfer_config
        extra = dict(ktc.kv_connector_extra_config or {})
        allow_fail = extra.pop("allow_fail_policy", False)
        if not isinstance(allow_fail, bool):
            raise ConfigError(f"kv_connector_extra_config.allow_fail_policy: expected true or false, got {allow_fail!r}")
        block_size = int(vllm_config.cache_config.block_size)
        self.config = load_connector_config(extra, block_size)
        self._stats_failed = False  # the last write of stats_path failed (warned once per failing run)
        policy = getattr(ktc, "kv_load_failure_policy", "fail")
        if policy != "recompute" and not allow_fail:
            raise ConfigError(
                'kvtier: set "kv_load_failure_policy": "recompute" in --kv-transfer-config, so that a chunk the '
                f'store loses costs a recompute instead of a failed request (it is {policy!r}); or set '
                '"allow_fail_policy": true in kv_connector_extra_config to keep it')
        mc, pc = vllm_config.model_config, vllm_config.parallel_config
        if mc.get_sliding_window() is not None:
            from kvtier.connectors.vllm.model import UnsupportedModelError

            raise UnsupportedModelError(
                "kvtier's vLLM connector does not support sliding-window attention models yet "
                f"(sliding_window={mc.get_sliding_window()})")
        self.model: ModelKV = model_kv(kv_cache_config.kv_cache_groups, pc.tensor_parallel_size,
                                       pc.pipeline_parallel_size, str(vllm_config.cache_config.cache_dtype),
                                       use_mla=bool(mc.use_mla), is_hybrid=bool(mc.is_hybrid))
        if self.model.block_size != block_size:
            raise ConfigError(f"KV cache block size {self.model.block_size} differs from vLLM's block_size {block_size}")
        self.is_cpu = current_platform.is_cpu()
        amx = cpu_amx_supported() if self.is_cpu else False
        self.format_tag = format_tag(self.is_cpu, self.model.layout, block_size, amx)
        layout = self.model.layout
        cfg = self.config
        chunk_tokens = cfg.store.chunk_tokens
        self.chunk_tokens = chunk_tokens
        self.cpu_isa = predict_cpu_isa(layout.dtype, block_size, layout.head_size, amx) if self.is_cpu else ""
        worker_role = role != KVConnectorRole.SCHEDULER
        # the worker's client starts after vLLM pinned the worker thread: its copies go elsewhere
        link = StoreLink(lambda first: open_client(cfg, layout, first, cpus_left_free() if worker_role else ()),
                         cfg.retry_after_s)
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        self._epoch = ""  # reset_cache: a random namespace epoch, after which nothing stored before is found
        self._roots: OrderedDict[tuple[str, str], bytes] | None = None
        if role == KVConnectorRole.SCHEDULER:
            client = link.client()
            assert client is not None
            fingerprint = cfg.model_fingerprint or vllm_model_fingerprint(vllm_config)
            layout_id = layout.layout_id(chunk_tokens)
            hash_mode = client.hash_mode
            # bounded: a deployment may give every user (or request) a cache_salt of its own
            roots: OrderedDict[tuple[str, str], bytes] = OrderedDict()
            self._roots = roots

            def root_for(salt: str, lora: str) -> bytes:
                root = roots.get((salt, lora))
                if root is None:
                    epoch = (f"epoch={self._epoch}",) if self._epoch else ()
                    ns = Namespace(fingerprint, layout_id, 0, salt, hash_mode,
                                   (f"format={self.format_tag}", *lora_extras(lora), *epoch))
                    root = roots[(salt, lora)] = ns.root()
                    if len(roots) > MAX_ROOTS:
                        roots.popitem(last=False)
                else:
                    roots.move_to_end((salt, lora))
                return root

            identity = Identity(fingerprint, layout_id.hex(), self.format_tag, chunk_tokens, hash_mode)
            # a partial chunk's tail is zeroed in the page's own layout (clear_tokens), which is checked
            # against vLLM's kernels for the vec ISAs only: AMX packs K in 16-token VNNI groups, and its
            # partial chunks would keep other tokens' K/V and lose half of their own
            partial = cfg.partial_chunks and (not self.is_cpu or self.cpu_isa in SUB_BLOCK_CPU_ISAS)
            if cfg.partial_chunks and not partial:
                log.info("kvtier: partial last chunks are off: the CPU kernel's page layout (ISA %s) is not one "
                         "kvtier can clear a chunk's tail in", self.cpu_isa)
            self.scheduler = SchedulerSide(link, root_for, chunk_tokens, hash_mode, cfg.save_decode,
                                           load=ktc.is_kv_consumer, save=ktc.is_kv_producer, block_size=block_size,
                                           partial_chunks=partial, identity=identity,
                                           remote_wait_s=cfg.remote_wait_s, publish_wait_s=cfg.publish_wait_s,
                                           chunk_bytes=layout.chunk_bytes(chunk_tokens), plan_loads=cfg.plan_loads,
                                           engine_id=f"vllm:{fingerprint}:{self.format_tag}",
                                           lease_s=cfg.lease_timeout_s)
            self.scheduler.leases.start()  # renews planned loads' leases while vLLM waits for a step
            from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

            # chunks saved by this instance carry vLLM's block hashes (as its KV events publish
            # them): the service's events then name blocks as vLLM's own do
            self.scheduler.convert_hash = maybe_convert_block_hash
            log.info("kvtier connector (scheduler) ready: model %s..., format %s, chunk %d tokens, block %d tokens",
                     fingerprint[:12], self.format_tag, chunk_tokens, block_size)
        else:
            self.worker = WorkerSide(link, self.model.layer_names, layout, block_size, chunk_tokens)
        self._interval_stats = StatsRecorder()  # for vLLM's /metrics (get_kv_connector_stats)

    # -- properties ----------------------------------------------------------------------
    @property
    def requires_kv_delivery(self) -> bool:
        return False  # best effort: a save dropped by a preemption is a future miss

    # -- scheduler role ------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.scheduler is not None
        return self.scheduler.num_new_matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self.scheduler is not None
        block_ids = blocks.get_block_ids()[0] if num_external_tokens > 0 else []
        self.scheduler.after_alloc(request, block_ids, num_external_tokens)
        self._record_tokens(request, num_external_tokens)

    def _record_tokens(self, request: Request, num_external_tokens: int) -> None:
        """Hit tokens (from the store) and computed tokens (left for vLLM to prefill, after its
        own prefix cache and the store) of a request being scheduled, for vLLM's /metrics."""
        assert self.scheduler is not None
        st = self.scheduler.reqs.get(request.request_id)
        local = st.local_tokens if st is not None else 0
        hit = max(num_external_tokens, 0)
        self._interval_stats.add_tokens(hit, request.num_tokens - local - hit)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.scheduler is not None
        state = getattr(scheduler_output, "kv_connector_block_state", None)
        manager = self._kv_cache_manager

        def block_ids_of(req_id: str) -> list[int] | None:
            groups = state.get_block_ids(req_id) if state is not None else None
            if groups is None and manager is not None:
                groups = manager.get_block_ids(req_id)
            return list(groups[0]) if groups else None

        plan = self.scheduler.build_plan(scheduler_output.num_scheduled_tokens, block_ids_of,
                                         scheduler_output.scheduled_spec_decode_tokens)
        plan.computed_tokens = int(scheduler_output.total_num_scheduled_tokens)
        if self.config.stats_path and plan:
            self._write_stats()
        return KVTierConnectorMetadata(plan)

    def _write_stats(self) -> None:
        """Rewrite stats_path (from vLLM's schedule(): a full disk or a removed folder is a warning,
        never an error that would stop the engine)."""
        assert self.scheduler is not None
        data = {**self.scheduler.stats, **self.scheduler.leases.stats,
                "loaded_chunks_by_tier": self.scheduler.loaded_by_tier,
                "loaded_tokens_by_tier": self.scheduler.loaded_tokens_by_tier, "chunk_tokens": self.chunk_tokens}
        tmp = f"{self.config.stats_path}.{os.getpid()}.tmp"  # two engines given one path do not share it
        try:
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.config.stats_path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not self._stats_failed:
                log.warning("kvtier: cannot write stats_path %s (%s); the engine goes on", self.config.stats_path, e)
            self._stats_failed = True
        else:
            self._stats_failed = False

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler is not None
        # False: the request's chunks were copied into the store's DRAM within the steps that computed
        # them (a producer included), so nothing reads its blocks after this and vLLM may free them at
        # once. Holding them (True) would not delay the answer either: vLLM sends a finished request's
        # kv_transfer_params at once; a producer's wait for its lower-tier writes is in the scheduler's
        # request_finished, which vLLM calls before it sends them
        return False, self.scheduler.request_finished(request)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self.scheduler is None:
            return
        if connector_output.invalid_block_ids:
            self.scheduler.load_errors(set(connector_output.invalid_block_ids))
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, KVTierWorkerMetadata) and meta.compute:
            self.scheduler.observe_compute(meta.compute)

    def build_connector_worker_meta(self) -> KVTierWorkerMetadata | None:
        """The worker's timed forwards (tokens, seconds) since the last step, for the scheduler's
        load planner (vLLM aggregates every worker's and hands them to update_connector_output)."""
        if self.worker is None:
            return None
        samples = self.worker.take_compute_samples()
        return KVTierWorkerMetadata(samples) if samples else None

    # -- worker role ---------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker is not None
        ctx = self._vllm_config.compilation_config.static_forward_context
        backends = set()
        for name in self.model.layer_names:
            layer = ctx.get(name)
            backend = layer.get_attn_backend() if layer is not None and hasattr(layer, "get_attn_backend") else None
            backends.add(backend.get_name() if backend is not None else "unknown")
        if len(backends) != 1:
            from kvtier.connectors.vllm.layouts import UnsupportedLayoutError

            raise UnsupportedLayoutError(f"layers use several attention backends {sorted(backends)}; not supported")
        backend_name = backends.pop()
        if self.chunk_tokens != self.model.block_size and (backend_name != "CPU_ATTN"
                                                           or self.cpu_isa not in SUB_BLOCK_CPU_ISAS):
            from kvtier.connectors.vllm.layouts import UnsupportedLayoutError

            raise UnsupportedLayoutError(
                f"kvtier: store.chunk_tokens {self.chunk_tokens} < block_size {self.model.block_size} is supported "
                f"only on the CPU_ATTN backend with the {'/'.join(SUB_BLOCK_CPU_ISAS)} kernels (this is "
                f"{backend_name}, ISA {self.cpu_isa or '-'}); set chunk_tokens to the block size")
        self.worker.register(kv_caches, backend_name, self._kv_cache_config.num_blocks)
        log.info("kvtier connector (worker) registered %d layers, backend %s, format %s",
                 len(kv_caches), backend_name, self.format_tag)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        return None  # saves are staged within their step: nothing of a preempted request is pending

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.worker is not None:
            plan = connector_metadata.plan if isinstance(connector_metadata, KVTierConnectorMetadata) else None
            self.worker.start_step(plan)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if self.worker is not None:
            self.worker.start_loads()

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self.worker is not None:
            self.worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        if self.worker is not None:
            self.worker.save_layer(layer_name)

    def wait_for_save(self) -> None:
        if self.worker is not None:
            self.worker.finish_step()

    # -- stats for vLLM's /metrics (both roles) -------------------------------------------------
    def get_kv_connector_stats(self) -> KVTierConnectorStats | None:
        """This side's numbers since vLLM last asked: the scheduler's token counts, the worker's
        per-request load and save times. vLLM merges both and feeds KVTierPromMetrics."""
        if self.worker is not None:
            ws = self.worker.stats
            for seconds in ws.load_seconds:
                self._interval_stats.add_load(seconds)
            for seconds in ws.save_seconds:
                self._interval_stats.add_save(seconds)
            ws.load_seconds, ws.save_seconds = [], []
        return self._interval_stats.take()

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """True: loads and saves are layer by layer (wait_for_layer_load, save_kv_layer), which vLLM
        runs between graph pieces only. vLLM's default FULL_AND_PIECEWISE mode replays a FULL graph
        for a batch of one-token requests (an exact repeat's first step is one), skipping both: its
        attention would read blocks the load stream is still copying, and its saves would be lost."""
        return True

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVTierConnectorStats | None:
        return KVTierConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[type, type], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVTierPromMetrics:
        return KVTierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def take_events(self) -> Iterable[KVCacheEvent]:
        """BlockStored (medium CPU) for each block this instance saved into the store since the
        last call, under vLLM's block hashes: vLLM's own publisher carries them. Only this
        instance's saves: the service publishes its tiers' events (evictions too) once, on its
        own socket (service `events`), for every instance sharing it. A save is reported when it
        is planned (the worker copies it within the same step); one the store then refuses (DRAM
        full, the service down) is reported all the same, and never removed from this stream."""
        if self.scheduler is None:
            return ()
        from vllm.distributed.kv_events import BlockStored

        return [BlockStored(block_hashes=[b.block_hash], parent_block_hash=b.parent, token_ids=b.token_ids,
                            block_size=self.chunk_tokens, lora_id=None, medium="CPU",
                            lora_name=b.lora_name or None)
                for b in self.scheduler.take_saved_blocks()]

    def reset_cache(self) -> bool | None:
        """vLLM's reset_prefix_cache(reset_connector=True), as RL frameworks call it after updating the
        weights in place: the weight files, and so the fingerprint, are unchanged, but the KV stored so
        far is the old weights'. This instance moves to a namespace of its own (a random epoch in its
        keys), so it never loads that KV again and saves under the new keys; chunks stored before stay
        for instances still on the old weights, and leave by eviction. Instances updated alike do not
        share with each other afterwards (no epoch is shared): restart them with a model_fingerprint
        naming the new weights for that."""
        if self.scheduler is None:
            return None  # the workers hold no index of what is stored
        self._epoch = secrets.token_hex(8)
        if self._roots is not None:
            self._roots.clear()
        self.scheduler.rekey_all()
        log.info("kvtier: connector cache reset: keys now under epoch %s; KV stored before is not loaded again",
                 self._epoch)
        return True

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_failed_blocks() if self.worker is not None else set()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
        elif self.scheduler is not None:
            self.scheduler.leases.close()
            self.scheduler.link.close()
