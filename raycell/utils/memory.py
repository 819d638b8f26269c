"""Handing freed heap memory back to the operating system, so that long streams run in flat memory.

Measured (a per-process memory timeline of `raycell train` on bench_scale.py's 1 M 32-px cells, `tiny` AEC,
and a one-process replay of `validate`; both ad-hoc scripts, not in bench/): a validation pass over
72,777 streamed cells
grew the training worker by ~330-460 MB (about 5 KB per cell) and the run's peak kept growing with the
validation split. It is not a leak: glibc's allocator keeps the pages of freed tensors and Arrow buffers
resident between live allocations (plausibly the small per-batch labels and probabilities kept for AUROC;
not proven), so the process's footprint ratchets up batch by batch. `malloc_trim(0)` every few
dozen batches returns
those free pages (the same pass then stayed within 50 MB, and ran no slower: 57 s vs 69 s). PyTorch has no
CPU caching allocator to configure for this, and `MALLOC_MMAP_THRESHOLD_` (the environment fix) made the
pass 1.4x slower, so this is done by hand. Only the validation passes trim: the training stream's heap stayed
flat without it. (A 1 M-cell epoch that trimmed every 32 steps took 812 s against 502 s for one that did not,
but the 812 s ran under bench_scale.py's 4 Hz memory sampler, which on its own made a 100 k training command
2x slower; trimming during training was not re-measured.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

TRIM_EVERY = (
    32  # batches between trims (the replay trimmed every 20 at no measurable cost; a trim's own
)
# cost grows with the heap and was not timed on its own)

_libc: ctypes.CDLL | None | bool = None


def trim_heap() -> bool:
    """Return free heap pages to the OS (glibc `malloc_trim(0)`); False where there is no glibc."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    if not _libc:
        return False
    return bool(_libc.malloc_trim(0))


def trimming(items: Iterable[T], every: int = TRIM_EVERY) -> Iterator[T]:
    """Yield from `items`, trimming the heap every `every` items and once at the end."""
    for i, item in enumerate(items, 1):
        yield item
        if i % every == 0:
            trim_heap()
    trim_heap()
