"""Block-based KV cache accounting: how many fixed-size blocks each request holds, and which freed
blocks still hold a reusable prefix."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class KVCache:
    """Counts KV blocks per request the way vLLM's block pool does, with or without prefix caching.

    Rules for callers: ``allocate`` grows a request to hold a number of tokens and refuses (False)
    rather than exceed the capacity; ``release`` gives all of a request's blocks back.

    Prefix caching follows vLLM's automatic prefix caching at the granularity the simulator needs:
    a released request may leave the full blocks of its first tokens cached under a key (its
    program); they count as free, are evicted least recently cached first when an allocation needs
    them, and a later request of the same key ``claim``s them instead of computing those tokens.
    """

    def __init__(self, capacity_blocks: int, block_size: int, prefix_caching: bool = False) -> None:
        self.capacity_blocks = capacity_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.free_blocks = capacity_blocks  # blocks no request holds (cached prefixes among them)
        self.peak_blocks = 0  # most blocks ever in use at once, for tests and reports
        self.held: dict[Hashable, int] = {}  # blocks held per request
        # Free blocks that still hold a prefix, per key, least recently cached first.
        self.cached: OrderedDict[Hashable, int] = OrderedDict()
        self.cached_blocks = 0
        self.hit_tokens_total = 0  # prompt tokens claimed from the cache, over the whole run

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def fits(self, tokens: int) -> bool:
        """Whether a request holding nothing yet could get blocks for ``tokens`` now (evicting cached prefixes)."""
        return self.blocks_for(tokens) <= self.free_blocks

    def allocate(self, request: Hashable, tokens: int) -> bool:
        """Grow the request's blocks to hold ``tokens`` tokens; False if the free blocks do not suffice."""
        held = self.held.get(request, 0)
        # Most calls are decodes that still fit their last block: answer those without arithmetic.
        if tokens <= held * self.block_size:
            return True
        needed = self.blocks_for(tokens) - held
        if needed > self.free_blocks:
            return False
        while self.free_blocks - self.cached_blocks < needed:  # evict the oldest cached prefixes
            _, blocks = self.cached.popitem(last=False)
            self.cached_blocks -= blocks
        self.held[request] = held + needed
        self.free_blocks -= needed
        self._note_use()
        return True

    def release(self, request: Hashable, key: Hashable, computed_tokens: int) -> None:
        """Give back all of the request's blocks; with prefix caching, those of its first
        ``computed_tokens`` tokens that are full stay cached under ``key`` (replacing what it held)."""
        held = self.held.pop(request, 0)
        self.free_blocks += held
        assert self.free_blocks <= self.capacity_blocks, "freed more KV blocks than were allocated"
        if not self.prefix_caching:
            return
        self.cached_blocks -= self.cached.pop(key, 0)
        keep = min(held, computed_tokens // self.block_size)
        if keep:
            self.cached[key] = keep
            self.cached_blocks += keep

    def hit_tokens(self, key: Hashable, limit: int) -> int:
        """Tokens a request of ``key`` would find cached now, of at most ``limit`` (whole blocks)."""
        return min(self.cached.get(key, 0), limit // self.block_size) * self.block_size

    def claim(self, request: Hashable, key: Hashable, limit: int) -> int:
        """A request that holds nothing takes the cached blocks of ``key`` covering up to ``limit``
        tokens; the rest of that entry is evicted. Returns the tokens it need not compute."""
        assert request not in self.held, "only a request that holds no blocks can start from a cached prefix"
        blocks = self.cached.pop(key, 0)
        self.cached_blocks -= blocks
        hit = min(blocks, limit // self.block_size)
        if hit:
            self.held[request] = hit
            self.free_blocks -= hit
            self.hit_tokens_total += hit * self.block_size
            self._note_use()
        return hit * self.block_size

    def _note_use(self) -> None:
        used = self.capacity_blocks - self.free_blocks
        assert 0 <= used <= self.capacity_blocks, "KV use above capacity"
        assert self.cached_blocks <= self.free_blocks, "cached prefixes outnumber the free blocks"
        if used > self.peak_blocks:
            self.peak_blocks = used
