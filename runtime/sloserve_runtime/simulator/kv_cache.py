"""Block-based KV cache accounting: how many fixed-size blocks each request holds."""

from __future__ import annotations

from collections.abc import Hashable


class KVCache:
    """Counts KV blocks per request the way vLLM's block pool does, without prefix caching.

    Rules for callers: ``allocate`` grows a request to hold a number of tokens and refuses (False)
    rather than exceed the capacity; ``free`` gives all of a request's blocks back.
    """

    def __init__(self, capacity_blocks: int, block_size: int) -> None:
        self.capacity_blocks = capacity_blocks
        self.block_size = block_size
        self.free_blocks = capacity_blocks
        self.peak_blocks = 0  # most blocks ever in use at once, for tests and reports
        self.held: dict[Hashable, int] = {}  # blocks held per request

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def fits(self, tokens: int) -> bool:
        """Whether a request holding nothing yet could get blocks for ``tokens`` now."""
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
        self.held[request] = held + needed
        self.free_blocks -= needed
        used = self.capacity_blocks - self.free_blocks
        assert 0 <= used <= self.capacity_blocks, "KV use above capacity"
        if used > self.peak_blocks:
            self.peak_blocks = used
        return True

    def free(self, request: Hashable) -> None:
        self.free_blocks += self.held.pop(request, 0)
        assert self.free_blocks <= self.capacity_blocks, "freed more KV blocks than were allocated"
