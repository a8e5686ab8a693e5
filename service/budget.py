"""The budget of bytes in flight: what all requests together hold at once (bodies, decoding, queued images), and the
video temp files on disk. A request that would go over waits for room until its deadline, then gets a 503."""

from __future__ import annotations

import asyncio
import collections
import time

from .errors import ServiceError


class ByteBudget:
    """Bytes held by all requests together (bodies, decoding, queued images). ``reserve`` waits for room until
    a deadline: a burst of large uploads is served one after another instead of all at once."""

    def __init__(self, limit: int, held: str = "in memory", too_large: str = "image_too_large"):
        self.limit, self.used, self.peak = int(limit), 0, 0  # peak: the most ever held at once
        self.held, self.too_large = held, too_large  # the replies' words: where the bytes are, the 413's code
        self._freed = asyncio.Condition()
        self._waiting: collections.deque = collections.deque()  # tickets of the reservations waiting, oldest first

    async def reserve(self, n: int, deadline: float, in_line: bool = True) -> int:
        """Reserve ``n`` bytes, first come first served: a large reservation that waits is not overtaken by small
        ones that fit (with inference in the budget, small ones always fit again and a large one waited until its
        deadline, ``benchmarks/service.py --hostile``). ``in_line=False``: bytes already received (a body's chunks),
        taken as soon as they fit, so that a slow upload is not held up past its deadline by a large reservation."""
        if n > self.limit:
            raise ServiceError(413, self.too_large, f"this request needs {n} bytes {self.held}; the service "
                                                    f"holds at most {self.limit} for all requests")
        ticket = object()
        async with self._freed:
            if in_line:
                self._waiting.append(ticket)
            try:
                while (in_line and self._waiting[0] is not ticket) or self.used + n > self.limit:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ServiceError(503, "busy", f"too many large requests in flight (bytes {self.held})",
                                           {"Retry-After": "1"})
                    try:
                        await asyncio.wait_for(self._freed.wait(), remaining)
                    except asyncio.TimeoutError:
                        pass
            finally:
                if in_line:
                    self._waiting.remove(ticket)
                    self._freed.notify_all()  # the next in line may fit
            self.used += n
            self.peak = max(self.peak, self.used)
        return n

    async def release(self, n: int) -> None:
        if n:
            async with self._freed:
                self.used -= n
                self._freed.notify_all()

    async def release_all(self, held: list[int]) -> None:
        """Give back every reservation in ``held`` (and empty it): a request's bytes, however it ended."""
        await self.release(sum(held))
        held.clear()
