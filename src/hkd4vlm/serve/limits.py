"""What bounds the memory of the requests in flight: a byte budget, and the process's resident memory.

Each scoring request reserves, before its body is read, the most it may hold: while it is parsed, its body,
the base64 text and the decoded bytes (``BODY_FACTOR`` times its Content-Length, or the body limit when no
length is given), and then its image scaled down to ``max_side`` pixels on the longer side. Once the image
is decoded, the reservation shrinks to the image's pixels, which is all the request holds while it waits for
the model. A request that does not fit is refused at once with 503 and Retry-After, like one beyond the queue
limit. Decoding itself runs on a small fixed pool of threads, so that at most that many images exist at full
size at a time (each at most the pixel limit).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
from collections.abc import Callable

from .config import BODY_FACTOR, request_reservation  # noqa: F401  (what one request may hold: the config's)
from .requests import RequestError


class MemoryBudget:
    """Bytes reserved by the requests in flight, at most ``limit``. Used from the event loop only (no lock)."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"the in-flight memory budget must be at least 1 byte, got {limit}")
        self.limit = limit
        self.used = self.peak = self.refused = 0

    def reserve(self, n: int) -> Reservation:
        """A reservation of ``n`` bytes; RequestError 503 when it does not fit beside the others."""
        if self.used + n > self.limit:
            self.refused += 1
            raise RequestError(
                503,
                f"server busy: the requests in flight hold {self.used / 2**20:.1f} MiB of the "
                f"{self.limit / 2**20:.0f} MiB budget (this one needs {n / 2**20:.1f} MiB); retry later",
                retry_after=1,
            )
        self.used += n
        self.peak = max(self.peak, self.used)
        return Reservation(self, n)


class Reservation:
    def __init__(self, budget: MemoryBudget, n: int):
        self.budget, self.n = budget, n

    def shrink(self, n: int) -> None:
        """Hold ``n`` bytes from now on (never more than reserved)."""
        n = min(n, self.n)
        self.budget.used -= self.n - n
        self.n = n

    def release(self) -> None:
        self.shrink(0)


def image_bytes(image) -> int:
    """Bytes of a decoded PIL image's pixels."""
    return image.width * image.height * len(image.getbands())


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux: /proc/self/statm), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


class IdleTrim:
    """Hands the C heap's free pages back to the system (glibc ``malloc_trim``) once the server has been idle
    for ``delay_s``: the image buffers that the decoding threads free otherwise stay in the process's
    resident memory after a load round. A no-op where glibc is not the allocator."""

    def __init__(self, is_idle: Callable[[], bool], delay_s: float = 0.5):
        self.is_idle, self.delay_s = is_idle, delay_s
        self.trim = _malloc_trim()
        self.trims = 0
        self._pending = False

    def soon(self) -> None:
        """Trim ``delay_s`` from now if the server is idle then (call from the event loop)."""
        if self.trim is None or self._pending:
            return
        self._pending = True
        asyncio.get_running_loop().call_later(self.delay_s, self._fire)

    def _fire(self) -> None:
        self._pending = False
        if self.is_idle():
            self.trim(0)
            self.trims += 1
