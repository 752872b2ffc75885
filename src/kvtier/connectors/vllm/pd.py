"""Prefill/decode disaggregation through the store: what a producer hands a consumer.

A prefill instance (kv_role "kv_producer") computes a prompt and saves its chunks into its host's
store in the very step that computes them (worker.py), so by the time vLLM calls request_finished
they are published in its DRAM, and its lower tiers (a shared folder, Redis) get them in the
background. A request that asked for it (kv_transfer_params {"do_remote_decode": true}, as vLLM's
disaggregation proxies send) is answered only once those background writes of its chunks have
ended (request_finished waits, up to publish_wait_s, on the store's wait_lower: vLLM sends the
answer after request_finished returns), so the decode instance the proxy then calls finds them at
once: the write is paid in the prefill leg, not inside the decode instance's TTFT. It then gets
back, in its output's kv_transfer_params, a `Handoff`:

    {"kvtier": {"v": 1, "model": ..., "layout": ..., "format": ..., "chunk_tokens": 32,
                "hash_mode": "sha256", "chunks": 3, "partial_tokens": 5, "last_key": "<hex>",
                "prompt_tokens": 101, "prompt_digest": "<hex>"}}

(`chunks` counts only what the store holds when the request ends, checked by a lookup.) A decode
instance (kv_role "kv_consumer") given those parameters on the same prompt checks them against its
own identity (model fingerprint, KV layout, byte format, chunk size, hash mode), against its
prompt (`prompt_tokens` and `prompt_digest`: a prompt that only shares or extends the producer's
whole chunks is refused too; a handoff without them, from an older producer, is checked by its
keys alone) and against its own key chain of the prompt (`last_key`: the last published chunk's
key, so another cache salt or LoRA adapter never matches), then waits, up to remote_wait_s, until its
store shows every published chunk (a safety net: the producer's wait may have ended at its bound,
or the shared tier may show a write late) and loads them. Parameters that do not match, or chunks that never appear, cost a recompute
and a warning, never wrong KV: keys are content digests, so whatever is found is right.
A refused handoff is also reported back in the request's output kv_transfer_params
({"kvtier_refused": {"kind": ..., "message": ...}}, `Refusal`): kvtier proxy turns a refusal of
kind "identity" (the two instances run another model, layout, format, chunk size or hash mode:
a deployment error, not one request's) into an HTTP error naming the fields that differ.

The producer need not hold the request's blocks (request_finished returns False): nothing of
its chunks is read from vLLM's pages after the step that computed them. Holding them would not
delay the answer either (vLLM sends a finished request's kv_transfer_params at once, whatever
request_finished says of its blocks), hence the wait inside request_finished. That wait blocks the
prefill engine's scheduler loop: other requests finishing in that step are answered late too.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PARAMS_KEY = "kvtier"  # our entry in kv_transfer_params
ASK_KEY = "do_remote_decode"  # the prefill request's flag asking for a handoff (vLLM's name)
HANDOFF_VERSION = 1


REFUSED_KEY = "kvtier_refused"  # a consumer's output kv_transfer_params entry: the handoff it refused
REFUSAL_KINDS = ("malformed", "identity", "prompt")


class HandoffError(ValueError):
    """kv_transfer_params["kvtier"] is malformed or was made for another model, layout or prompt.

    `kind`: "malformed" (not a handoff of this version), "identity" (made by an instance with another
    model, KV layout, byte format, chunk size or hash mode, or one that saves partial chunks where
    this one does not), "prompt" (made for another prompt, cache salt or adapter).
    """

    def __init__(self, message: str, kind: str = "malformed") -> None:
        super().__init__(message)
        assert kind in REFUSAL_KINDS, kind
        self.kind = kind

    def to_params(self) -> dict[str, Any]:
        """The refusal as a consumer reports it in its request's output kv_transfer_params."""
        return {REFUSED_KEY: {"kind": self.kind, "message": str(self)}}


def refusal_in(params: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(kind, message) of the refusal a consumer reported in its output kv_transfer_params, else None."""
    raw = params.get(REFUSED_KEY) if isinstance(params, Mapping) else None
    if not isinstance(raw, Mapping):
        return None
    kind = raw.get("kind")
    return (kind if kind in REFUSAL_KINDS else "malformed", str(raw.get("message", "")))


@dataclass(frozen=True, slots=True)
class Identity:
    """What must be equal on both sides for a chunk's bytes to mean the same KV."""

    model: str  # model fingerprint (config + weights)
    layout: str  # KVLayout.layout_id(chunk_tokens), in hex
    format: str  # the engine's page byte format (format_tag)
    chunk_tokens: int
    hash_mode: str

    def mismatch(self, other: Identity) -> str:
        """'' when equal, else which fields differ (ours vs theirs), for the warning."""
        diffs = []
        for name in ("model", "layout", "format", "chunk_tokens", "hash_mode"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                diffs.append(f"{name} {str(theirs)[:24]!r} (producer) != {str(mine)[:24]!r} (this instance)")
        return "; ".join(diffs)


@dataclass(frozen=True, slots=True)
class Handoff:
    identity: Identity
    chunks: int  # whole prompt chunks published: chain keys [0, chunks)
    partial_tokens: int  # > 0: the prompt's partial last chunk of that many tokens is published too
    last_key: str  # hex digest of the last published chunk's key ("" when nothing was published)
    # the producer's whole prompt: its length and prompt_digest(); a consumer refuses a handoff made
    # for another prompt, even one its own extends or shares all whole chunks with (-1, "": not sent)
    prompt_tokens: int = -1
    prompt_digest: str = ""

    def to_params(self) -> dict[str, Any]:
        ident = self.identity
        out = {"v": HANDOFF_VERSION, "model": ident.model, "layout": ident.layout,
               "format": ident.format, "chunk_tokens": ident.chunk_tokens,
               "hash_mode": ident.hash_mode, "chunks": self.chunks,
               "partial_tokens": self.partial_tokens, "last_key": self.last_key}
        if self.prompt_tokens >= 0:
            out["prompt_tokens"], out["prompt_digest"] = self.prompt_tokens, self.prompt_digest
        return {PARAMS_KEY: out}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Handoff | None:
        """The handoff in a request's kv_transfer_params; None when it carries none."""
        raw = params.get(PARAMS_KEY)
        if raw is None:
            return None
        where = f"kv_transfer_params[{PARAMS_KEY!r}]"
        if not isinstance(raw, Mapping):
            raise HandoffError(f"{where}: expected an object, got {type(raw).__name__}")
        if raw.get("v") != HANDOFF_VERSION:
            raise HandoffError(f"{where}.v: expected {HANDOFF_VERSION}, got {raw.get('v')!r}")

        def text(name: str) -> str:
            value = raw.get(name)
            if not isinstance(value, str):
                raise HandoffError(f"{where}.{name}: expected a string, got {value!r}")
            return value

        def count(name: str) -> int:
            value = raw.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise HandoffError(f"{where}.{name}: expected an integer >= 0, got {value!r}")
            return value

        last_key = text("last_key")
        try:
            bytes.fromhex(last_key)
        except ValueError:
            raise HandoffError(f"{where}.last_key: expected a hex digest, got {last_key[:40]!r}") from None
        prompt = (count("prompt_tokens"), text("prompt_digest")) if "prompt_tokens" in raw else (-1, "")
        handoff = cls(Identity(text("model"), text("layout"), text("format"), count("chunk_tokens"),
                               text("hash_mode")), count("chunks"), count("partial_tokens"), last_key, *prompt)
        if bool(last_key) != bool(handoff.chunks or handoff.partial_tokens):
            raise HandoffError(f"{where}: last_key must be set exactly when chunks or partial_tokens are")
        return handoff


def prompt_digest(root: bytes, tokens: Sequence[int]) -> str:
    """The digest of a whole prompt under its namespace root (model, layout, salt, adapter): what a
    consumer compares to tell the producer's prompt from one that only shares its whole chunks."""
    return hashlib.sha256(bytes(root) + array("I", list(tokens)).tobytes()).hexdigest()[:32]


def asks_for_handoff(params: Mapping[str, Any] | None) -> bool:
    return bool(params) and params.get(ASK_KEY) is True  # type: ignore[union-attr]
