"""kvtier.service: the per-host store service (`kvtier serve`).

server.py runs it (serve_main), host.py holds leases, pins and reservations over one
TieredStore, protocol.py is the wire format, shm.py the shared-memory pool.
"""

from kvtier.service.config import ServiceConfig
from kvtier.service.protocol import FlushTimeoutError, LeaseError, ProtocolError, ServiceError

__all__ = ["FlushTimeoutError", "LeaseError", "ProtocolError", "ServiceConfig", "ServiceError"]
