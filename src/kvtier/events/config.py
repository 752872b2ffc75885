"""The KV-event publisher's settings (one frozen dataclass, checked where it is built)."""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.core.errors import ConfigError
from kvtier.events.wire import ENCODINGS

ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")


@dataclass(slots=True, frozen=True)
class EventsConfig:
    """Where and how kvtier publishes KV events, as vLLM's `--kv-events-config` does.

    endpoint         the PUB socket, bound (tcp://127.0.0.1:5557, ipc:///path)
    replay_endpoint  the ROUTER socket a subscriber asks for missed batches (None: no replay)
    topic            the first frame of every message
    encoding         "map" (vLLM 0.32) or "array" (older vLLM subscribers)
    buffer_steps     how many past batches the replay socket can resend
    max_queue_size   events waiting for the publisher thread; beyond it they are dropped and
                     counted (a tier never waits on a subscriber)
    batch_max_events the most events one batch carries
    """

    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""
    encoding: str = "map"
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    batch_max_events: int = 512
    data_parallel_rank: int | None = None

    def __post_init__(self) -> None:
        for name in ("endpoint", "replay_endpoint"):
            value = getattr(self, name)
            if value is None and name == "replay_endpoint":
                continue
            if not isinstance(value, str) or not value.startswith(ENDPOINT_SCHEMES):
                raise ConfigError(f"events.{name} must be a ZMQ address starting with one of {ENDPOINT_SCHEMES}, got {value!r}")
        if self.replay_endpoint == self.endpoint and not self.endpoint.endswith((":*", ":0")):
            raise ConfigError("events.replay_endpoint must differ from events.endpoint")
        if not isinstance(self.topic, str):
            raise ConfigError(f"events.topic must be a string, got {self.topic!r}")
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"events.encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        for name in ("buffer_steps", "hwm", "max_queue_size", "batch_max_events"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"events.{name} must be an int >= 1, got {value!r}")
        rank = self.data_parallel_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ConfigError(f"events.data_parallel_rank must be an int >= 0 or None, got {rank!r}")
