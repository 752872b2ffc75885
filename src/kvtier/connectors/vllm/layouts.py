"""Layout adapters: one vLLM layer's paged KV tensor <-> kvtier chunk sections.

vLLM 0.32 gives every layer a logical 4-D view [B, H, N, C] (blocks, KV heads, tokens of a
kernel block, K and V content) over one flat buffer, with physical strides set by the
KV cache layout; what the last two axes mean is up to the attention backend. An adapter
is chosen by backend name, checks the view at register_kv_caches and refuses (with
UnsupportedLayoutError) any shape, dtype, stride or block split it does not map.

    save_source(block) -> uint8 array of one section (a view or a fresh copy)
    load_target(block) -> (uint8 array to load into, finish() to run after the load or None)
    load_targets(blocks) -> the same for many blocks (one list of arrays, one list of finishers)

Chunks smaller than a block (chunk_tokens a divisor of block_size; only adapters with
sub_block = True, others refuse at construction):

    gather_chunks(blocks, offsets, out) -> [n, section bytes] uint8 copy of chunks at (block, token offset)
    scatter_chunks(blocks, offsets, sections) -> copy [n, section bytes] into those places

Adapters (registry ADAPTERS):
- CPU_ATTN -> CpuPageAdapter: the CPU kernel reads each block's [H, N, C] as [H, 2N, D] and
  keeps K transposed ([D, N]) and V as [N, D] inside each head, in an ISA-dependent order.
  A block is therefore moved as one opaque page of bytes (a zero-copy view both ways); the
  page must be contiguous and the chunk must be exactly one block. The pages of a layer are
  one [blocks, page bytes] uint8 array made at register time, so a load of N blocks costs
  N row lookups, not N tensor views.
  Chunks smaller than a block: measured on vLLM 0.32's "vec"/"vec16" kernels (float32 on x86
  without AMX), each head of a page is K transposed [D, N] followed by V [N, D]. A chunk's
  section is then the page of a chunk-sized block: per head, K^T [D, c] then V [c, D], i.e.
  token columns [off, off+c) of K^T and rows [off, off+c) of V. Moved with one numpy fancy
  assignment per plane for all chunks of a layer. Other ISAs (AMX packs K in VNNI tiles) are
  refused at register_kv_caches (SUB_BLOCK_CPU_ISAS).
- FLASH_ATTN, TRITON_ATTN, FLEX_ATTENTION -> SplitLastAdapter: these backends read
  `kv.transpose(1, 2).split(head_size, -1)`, i.e. kv[b, h, n, :D] is K and kv[b, h, n, D:]
  is V of token n, for any stride order. Sections hold kvtier's canonical
  [H, K|V, tokens, D]; kernel blocks smaller than vLLM's block are gathered in order. The
  worker moves a layer's blocks with one index op on the KV tensor's device (gather_device /
  scatter_device: index_select / index_copy_ with index tensors), so a GPU cache costs one
  host <-> GPU copy per layer, not one per block.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kvtier.connectors.copy_engine import staging_buffer
from kvtier.connectors.vllm.model import UnsupportedModelError, torch_dtype_name
from kvtier.core.layout import KVLayout


class UnsupportedLayoutError(UnsupportedModelError):
    """A backend, dtype or KV view the connector cannot map to kvtier's chunk sections."""


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1).view(torch.uint8).numpy()


SUB_BLOCK_CPU_ISAS = ("vec", "vec16")  # CPU_ATTN ISAs whose page layout sub-block chunks are checked against


def _run_dtype(nbytes: int) -> np.dtype[Any]:
    """One opaque element per contiguous run: numpy then copies a run with one memcpy."""
    return np.dtype((np.void, nbytes))


def _reshaped(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A view of `a` with `shape`; raises rather than copying (a copy would load into nowhere)."""
    v = a.view()
    v.shape = shape
    return v


class BlockAdapter(ABC):
    canonical: bool  # True: sections hold canonical [H, 2, N, D]; False: opaque backend pages
    sub_block: bool = False  # True: moves chunks smaller than a block (gather_chunks / scatter_chunks)
    batched: bool = False  # True: moves a layer's blocks with one index op (gather_device / scatter_device)

    def __init__(self, kv: torch.Tensor, layout: KVLayout, num_blocks: int, block_size: int,
                 chunk_tokens: int | None = None) -> None:
        self.kv = kv
        self.layout = layout
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.chunk_tokens = block_size if chunk_tokens is None else chunk_tokens
        if self.chunk_tokens <= 0 or block_size % self.chunk_tokens:
            raise UnsupportedLayoutError(f"chunk_tokens {self.chunk_tokens} does not divide vLLM's block_size "
                                         f"{block_size}")
        if self.chunk_tokens != block_size and not self.sub_block:
            raise UnsupportedLayoutError(
                f"{type(self).__name__} moves whole vLLM blocks only: set the store's chunk_tokens to the "
                f"block_size {block_size} (it is {self.chunk_tokens})")
        if kv.dim() != 4:
            raise UnsupportedLayoutError(f"expected a 4-D [blocks, heads, tokens, K|V] KV view, got shape {tuple(kv.shape)}")
        if torch_dtype_name(kv.dtype) != layout.dtype:
            raise UnsupportedLayoutError(f"KV view dtype {kv.dtype} differs from the model's KV dtype {layout.dtype}")
        if kv.shape[0] % num_blocks:
            raise UnsupportedLayoutError(f"KV view has {kv.shape[0]} blocks, not a multiple of {num_blocks}")
        self.ratio = kv.shape[0] // num_blocks  # kernel blocks per vLLM block
        expect = (num_blocks * self.ratio, layout.num_kv_heads, block_size // self.ratio, 2 * layout.head_size)
        if tuple(kv.shape) != expect or block_size % self.ratio:
            raise UnsupportedLayoutError(
                f"KV view shape {tuple(kv.shape)} is not [blocks, kv_heads, tokens, 2*head_size] = {expect} "
                "(padded heads or pages are not supported)")

    @abstractmethod
    def save_source(self, block: int) -> np.ndarray: ...

    @abstractmethod
    def load_target(self, block: int) -> tuple[np.ndarray, Callable[[], None] | None]: ...

    def load_targets(self, blocks: list[int]) -> tuple[list[np.ndarray], list[Callable[[], None] | None]]:
        pairs = [self.load_target(b) for b in blocks]
        return [t for t, _ in pairs], [f for _, f in pairs]

    def clear_block(self, block: int) -> None:
        """Zero a whole block: what a failed load copied there must not stay (vLLM recomputes the
        tokens it holds, but rows past a prompt's end are only masked, and garbage may be NaN)."""
        target, finish = self.load_target(block)
        target[:] = 0
        if finish is not None:
            finish()

    def clear_tokens(self, section: np.ndarray, valid: int) -> None:
        """Zero tokens [valid, chunk_tokens) of one chunk's section (bytes, as save_source or
        gather_chunks give it): a partial chunk stores its own tokens and zeros, never whatever
        an earlier request left in the rest of its block. Canonical [H, 2, N, D] sections here."""
        lay = self.layout
        _reshaped(section, (lay.num_kv_heads * lay.planes, self.chunk_tokens, -1))[:, valid:] = 0

    def gather_chunks(self, blocks: list[int], offsets: list[int], out: np.ndarray | None = None) -> np.ndarray:
        raise UnsupportedLayoutError(f"{type(self).__name__} cannot move chunks smaller than a block")

    def gather_device(self, blocks: list[int], last_valid: int = 0) -> torch.Tensor:
        raise UnsupportedLayoutError(f"{type(self).__name__} has no batched device gather")

    def scatter_device(self, blocks: list[int], sections: torch.Tensor) -> None:
        raise UnsupportedLayoutError(f"{type(self).__name__} has no batched device scatter")

    def scatter_chunks(self, blocks: list[int], offsets: list[int], sections: np.ndarray) -> None:
        raise UnsupportedLayoutError(f"{type(self).__name__} cannot move chunks smaller than a block")


class CpuPageAdapter(BlockAdapter):
    canonical = False
    sub_block = True

    def __init__(self, kv: torch.Tensor, layout: KVLayout, num_blocks: int, block_size: int,
                 chunk_tokens: int | None = None) -> None:
        super().__init__(kv, layout, num_blocks, block_size, chunk_tokens)
        if self.ratio != 1:
            raise UnsupportedLayoutError(f"CPU pages split into {self.ratio} kernel blocks are not supported")
        if kv.device.type != "cpu":
            raise UnsupportedLayoutError(f"CPU_ATTN KV view lives on {kv.device}, expected the CPU")
        if not kv[0].is_contiguous():
            raise UnsupportedLayoutError(
                f"CPU_ATTN KV pages are not contiguous (strides {kv.stride()}); kvtier needs the LBHNC/BLHNC layout")
        if kv[0].numel() * kv.element_size() != layout.layer_bytes(block_size):
            raise UnsupportedLayoutError("CPU_ATTN page size differs from a kvtier section")
        # [blocks, page bytes]; rows are contiguous pages, blocks may sit at any stride
        flat = kv.flatten(1)
        if flat.untyped_storage().data_ptr() != kv.untyped_storage().data_ptr():
            raise UnsupportedLayoutError(f"CPU_ATTN KV pages cannot be viewed as rows (strides {kv.stride()})")
        self.pages: np.ndarray = flat.view(torch.uint8).numpy()
        c, n, h = self.chunk_tokens, block_size, layout.num_kv_heads
        self.section_bytes = layout.layer_bytes(c)
        if c != n:
            e, d = kv.element_size(), layout.head_size
            halves = _reshaped(self.pages, (num_blocks, h, 2, n * d * e))  # per head: K^T [D, N], then V [N, D]
            kt, vt = _run_dtype(c * e), _run_dtype(c * d * e)  # a chunk's run of K^T and its V rows
            self._k = _reshaped(halves[:, :, 0].view(kt), (num_blocks, h, d, n // c))  # [B, H, D, r]
            self._v = _reshaped(halves[:, :, 1].view(vt), (num_blocks, h, n // c))  # [B, H, r]
            self._k_unit, self._v_unit = kt, vt

    def clear_tokens(self, section: np.ndarray, valid: int) -> None:
        """Zero tokens [valid, chunk_tokens) of a CPU section: per head K^T [D, N] then V [N, D]."""
        lay, n = self.layout, self.chunk_tokens
        halves = _reshaped(section, (lay.num_kv_heads, 2, n * lay.head_size * lay.dtype_size))
        _reshaped(halves[:, 0], (lay.num_kv_heads, lay.head_size, n, lay.dtype_size))[:, :, valid:] = 0
        _reshaped(halves[:, 1], (lay.num_kv_heads, n, lay.head_size * lay.dtype_size))[:, valid:] = 0

    def _section_planes(self, sections: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[n, H, D] K^T runs and [n, H] V runs of n chunk sections."""
        lay, n = self.layout, sections.shape[0]
        halves = _reshaped(sections, (n, lay.num_kv_heads, 2, sections.shape[1] // (2 * lay.num_kv_heads)))
        return halves[:, :, 0].view(self._k_unit), halves[:, :, 1].view(self._v_unit)[..., 0]

    def _whole_blocks(self, blocks: list[int], offsets: list[int]) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(block ids, chunk indices in block, s, m): rows [s, s + m*r) are m whole blocks, chunks in order.

        Whole blocks move with one index per block (3x faster than one per chunk); the rest
        (a block begun or ended by a hit or a save) with one index per chunk.
        """
        r = self.block_size // self.chunk_tokens
        b = np.asarray(blocks, dtype=np.intp)
        j = np.asarray(offsets, dtype=np.intp) // self.chunk_tokens
        starts = np.flatnonzero(j == 0)
        if not len(starts):
            return b, j, 0, 0
        s = int(starts[0])
        m = (len(b) - s) // r
        bb, jj = b[s:s + m * r].reshape(m, r), j[s:s + m * r].reshape(m, r)
        full = (bb == bb[:, :1]).all(axis=1) & (jj == np.arange(r)).all(axis=1)
        m = int(np.argmin(full)) if not full.all() else m
        return b, j, s, m

    def _moves(self, blocks: list[int], offsets: list[int], sections: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, Any]]:
        """(view of `sections`, page array, index into it) pairs that move chunks between the
        sections and vLLM's pages: gather copies page[index] into each view, scatter the reverse."""
        b, j, s, m = self._whole_blocks(blocks, offsets)
        k, v = self._section_planes(sections)
        r = self.block_size // self.chunk_tokens
        e = s + m * r
        moves: list[tuple[np.ndarray, np.ndarray, Any]] = []
        if m:
            whole = b[s:e:r]
            moves.append((k[s:e].reshape(m, r, *k.shape[1:]).transpose(0, 2, 3, 1), self._k, whole))
            moves.append((v[s:e].reshape(m, r, v.shape[1]).transpose(0, 2, 1), self._v, whole))
        for rows in (slice(0, s), slice(e, len(b))):
            if rows.stop > rows.start:
                moves.append((k[rows], self._k, (b[rows], slice(None), slice(None), j[rows])))
                moves.append((v[rows], self._v, (b[rows], slice(None), j[rows])))
        return moves

    def gather_chunks(self, blocks: list[int], offsets: list[int], out: np.ndarray | None = None) -> np.ndarray:
        sections = np.empty((len(blocks), self.section_bytes), dtype=np.uint8) if out is None else out
        if self.chunk_tokens == self.block_size:
            np.take(self.pages, blocks, axis=0, out=sections)
            return sections
        for view, pages, index in self._moves(blocks, offsets, sections):
            view[...] = pages[index]
        return sections

    def scatter_chunks(self, blocks: list[int], offsets: list[int], sections: np.ndarray) -> None:
        if self.chunk_tokens == self.block_size:
            self.pages[blocks] = sections
            return
        for view, pages, index in self._moves(blocks, offsets, sections):
            pages[index] = view

    def save_source(self, block: int) -> np.ndarray:
        return self.pages[block]

    def load_target(self, block: int) -> tuple[np.ndarray, Callable[[], None] | None]:
        return self.pages[block], None

    def load_targets(self, blocks: list[int]) -> tuple[list[np.ndarray], list[Callable[[], None] | None]]:
        pages = self.pages
        return [pages[b] for b in blocks], [None] * len(blocks)


class SplitLastAdapter(BlockAdapter):
    """Batched (`batched`): a layer's blocks move with one index_select (save) or one index_copy_
    (load) on the KV tensor, on its device, between vLLM's paged view and [n, section bytes] rows
    of canonical sections; the per-block save_source / load_target (a host staging copy each)
    remain for callers that move one block at a time."""

    canonical = True
    batched = True

    def _kernel_index(self, blocks: list[int]) -> torch.Tensor:
        """Kernel-block ids of vLLM blocks `blocks`, in order, as an index tensor on the KV's device."""
        r = self.ratio
        b = torch.as_tensor(blocks, dtype=torch.long)
        if len(blocks) and (int(b.min()) < 0 or int(b.max()) >= self.num_blocks):
            raise ValueError(f"block ids must lie in 0..{self.num_blocks - 1}, got {min(blocks)}..{max(blocks)}")
        if r > 1:
            b = (b[:, None] * r + torch.arange(r)).reshape(-1)
        if self.kv.device.type == "cuda":  # from pageable memory the copy would first wait for the stream's queue
            b = b.pin_memory()
        return b.to(self.kv.device, non_blocking=True)

    def gather_device(self, blocks: list[int], last_valid: int = 0) -> torch.Tensor:
        """[n, section bytes] uint8 canonical sections of `blocks` on the KV's device: one
        index_select and one permuting copy. `last_valid` > 0: the last chunk holds only that many
        tokens; the rest of its section is zeroed (never what an earlier request left there)."""
        lay, r, n = self.layout, self.ratio, len(blocks)
        kbs, d = self.block_size // r, lay.head_size
        picked = self.kv.index_select(0, self._kernel_index(blocks))  # [n*r, H, kbs, 2D], contiguous
        canon = picked.view(n, r, lay.num_kv_heads, kbs, 2, d).permute(0, 2, 4, 1, 3, 5).contiguous()
        if last_valid and n:
            canon[-1].view(lay.num_kv_heads, 2, self.block_size, d)[:, :, last_valid:] = 0
        return canon.view(n, -1).view(torch.uint8)

    def scatter_device(self, blocks: list[int], sections: torch.Tensor) -> None:
        """Copy [n, section bytes] canonical sections (uint8, on the KV's device) into `blocks`."""
        lay, r, n = self.layout, self.ratio, len(blocks)
        kbs, d = self.block_size // r, lay.head_size
        if sections.shape != (n, lay.layer_bytes(self.block_size)) or sections.dtype != torch.uint8:
            raise ValueError(f"sections must be uint8 [{n}, {lay.layer_bytes(self.block_size)}], "
                             f"got {sections.dtype} {tuple(sections.shape)}")
        src = sections.view(self.kv.dtype).view(n, lay.num_kv_heads, 2, r, kbs, d).permute(0, 3, 1, 4, 2, 5)
        self.kv.index_copy_(0, self._kernel_index(blocks), src.reshape(n * r, lay.num_kv_heads, kbs, 2 * d))

    def clear_block(self, block: int) -> None:
        r = self.ratio
        self.kv[block * r:(block + 1) * r].zero_()

    def _canonical_view(self, block: int) -> torch.Tensor:
        """[H, 2, r, kbs, D] view of vLLM block `block` (r kernel blocks of kbs tokens)."""
        r, d = self.ratio, self.layout.head_size
        blocks = self.kv[block * r:(block + 1) * r]  # [r, H, kbs, 2D]
        return blocks.unflatten(-1, (2, d)).permute(1, 3, 0, 2, 4)

    def _staging(self) -> torch.Tensor:
        """A host tensor for one block; page-locked when the cache is on a GPU (torch's caching host
        allocator reuses it, and keeps it until an asynchronous copy from it has completed)."""
        lay, r = self.layout, self.ratio
        shape = (lay.num_kv_heads, 2, r, self.block_size // r, lay.head_size)
        if not self.kv.is_cuda:
            return torch.empty(shape, dtype=self.kv.dtype)
        flat, _ = staging_buffer(int(np.prod(shape)) * self.kv.element_size(), self.kv.device)
        return flat.view(self.kv.dtype).view(shape)

    def save_source(self, block: int) -> np.ndarray:
        staging = self._staging()
        staging.copy_(self._canonical_view(block))
        return _as_bytes(staging)

    def load_target(self, block: int) -> tuple[np.ndarray, Callable[[], None] | None]:
        staging = self._staging()
        view = self._canonical_view(block)

        def finish() -> None:
            view.copy_(staging, non_blocking=staging.is_pinned())  # ordered before the forward's kernels

        return _as_bytes(staging), finish


ADAPTERS: dict[str, type[BlockAdapter]] = {
    "CPU_ATTN": CpuPageAdapter,
    "FLASH_ATTN": SplitLastAdapter,
    "TRITON_ATTN": SplitLastAdapter,
    "FLEX_ATTENTION": SplitLastAdapter,
}


def make_adapter(backend: str, kv: torch.Tensor, layout: KVLayout, num_blocks: int, block_size: int,
                 chunk_tokens: int | None = None) -> BlockAdapter:
    cls = ADAPTERS.get(backend)
    if cls is None:
        raise UnsupportedLayoutError(
            f"kvtier's vLLM connector has no layout adapter for the {backend!r} attention backend; "
            f"supported: {sorted(ADAPTERS)}")
    return cls(kv, layout, num_blocks, block_size, chunk_tokens)
