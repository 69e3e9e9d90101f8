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
    Requests of one key that run at once (a program's fan-out) share the claimed blocks, as vLLM's
    blocks are shared by reference count: the prefix is in use once, until the last of them ends.

    A prefix may also be released *held* (``release(..., hold=True)``): its blocks stay in use,
    never evicted, until the key's next request claims them or ``unhold`` frees them to the cache
    (a program run's context between its stages).
    """

    def __init__(self, capacity_blocks: int, block_size: int, prefix_caching: bool = False) -> None:
        self.capacity_blocks = capacity_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.free_blocks = capacity_blocks  # blocks no request holds (cached prefixes among them)
        self.peak_blocks = 0  # most blocks ever in use at once, for tests and reports
        self.held: dict[Hashable, int] = {}  # blocks each request holds on its own
        # Claimed prefixes in use, per key: [blocks, requests sharing them]; and each sharer's part.
        self.shared: dict[Hashable, list[int]] = {}
        self.sharing: dict[Hashable, tuple[Hashable, int]] = {}  # request -> (key, blocks it uses)
        # Free blocks that still hold a prefix, per key, least recently cached first.
        self.cached: OrderedDict[Hashable, int] = OrderedDict()
        self.cached_blocks = 0
        self.pinned: dict[Hashable, int] = {}  # held prefixes: blocks in use that no request holds, per key
        self.hit_tokens_total = 0  # prompt tokens claimed from the cache, over the whole run

    def blocks_of(self, request: Hashable) -> int:
        """The blocks a request uses: its own and the prefix it shares."""
        return self.held.get(request, 0) + (self.sharing[request][1] if request in self.sharing else 0)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def fits(self, tokens: int, key: Hashable = None) -> bool:
        """Whether a request holding nothing yet could get blocks for ``tokens`` now (evicting cached
        prefixes), starting from what is held or in use for ``key``."""
        ready = self.pinned.get(key, 0) + (self.shared[key][0] if key in self.shared else 0)
        return self.blocks_for(tokens) <= self.free_blocks + ready

    def allocate(self, request: Hashable, tokens: int) -> bool:
        """Grow the request's blocks to hold ``tokens`` tokens; False if the free blocks do not suffice."""
        held = self.held.get(request, 0)
        owned = self.blocks_of(request)
        # Most calls are decodes that still fit their last block: answer those without arithmetic.
        if tokens <= owned * self.block_size:
            return True
        needed = self.blocks_for(tokens) - owned
        if needed > self.free_blocks:
            return False
        while self.free_blocks - self.cached_blocks < needed:  # evict the oldest cached prefixes
            _, blocks = self.cached.popitem(last=False)
            self.cached_blocks -= blocks
        self.held[request] = held + needed
        self.free_blocks -= needed
        self._note_use()
        return True

    def release(self, request: Hashable, key: Hashable, computed_tokens: int, hold: bool = False) -> None:
        """Give back all of the request's blocks; with prefix caching, those of its first
        ``computed_tokens`` tokens that are full stay cached under ``key`` (replacing what it held),
        or, with ``hold``, stay in use for ``key``'s next request. While other requests of ``key``
        still share its claimed prefix, that prefix stays in use and nothing is cached yet."""
        held = self.held.pop(request, 0)
        self.free_blocks += held
        owned = held
        if request in self.sharing:
            shared_key, part = self.sharing.pop(request)
            entry = self.shared[shared_key]
            entry[1] -= 1
            owned += part
            if entry[1] > 0:  # a sibling still reads the prefix: it is cached when the last one ends
                assert self.free_blocks <= self.capacity_blocks, "freed more KV blocks than were allocated"
                return
            del self.shared[shared_key]
            self.free_blocks += entry[0]
        assert self.free_blocks <= self.capacity_blocks, "freed more KV blocks than were allocated"
        if not self.prefix_caching:
            return
        self.cached_blocks -= self.cached.pop(key, 0)
        self.free_blocks += self.pinned.pop(key, 0)
        keep = min(owned, computed_tokens // self.block_size)
        if keep and hold:
            self.pinned[key] = keep
            self.free_blocks -= keep
        elif keep:
            self.cached[key] = keep
            self.cached_blocks += keep

    def unhold(self, key: Hashable) -> None:
        """The held prefix of ``key`` goes back to the cache: free, and evicted when blocks run short."""
        blocks = self.pinned.pop(key, 0)
        if blocks:
            self.free_blocks += blocks
            self.cached_blocks -= self.cached.pop(key, 0)
            self.cached[key] = blocks
            self.cached_blocks += blocks

    @property
    def pinned_blocks(self) -> int:
        return sum(self.pinned.values())

    def hit_tokens(self, key: Hashable, limit: int) -> int:
        """Tokens a request of ``key`` would find cached, held or in use now, of at most ``limit`` (whole blocks)."""
        blocks = self.shared[key][0] if key in self.shared else self.pinned.get(key) or self.cached.get(key, 0)
        return min(blocks, limit // self.block_size) * self.block_size

    def claim(self, request: Hashable, key: Hashable, limit: int) -> int:
        """A request that holds nothing takes the prefix of ``key`` covering up to ``limit`` tokens:
        the one its siblings use now, or else the held or cached one (the rest of that entry is
        evicted). Returns the tokens it need not compute."""
        assert request not in self.held and request not in self.sharing, (
            "only a request that holds no blocks can start from a cached prefix"
        )
        if key in self.shared:
            entry = self.shared[key]
            hit = min(entry[0], limit // self.block_size)
            if hit:
                entry[1] += 1
                self.sharing[request] = (key, hit)
                self.hit_tokens_total += hit * self.block_size
            return hit * self.block_size
        pinned = self.pinned.pop(key, 0)
        if pinned:  # a held prefix: its blocks are in use already; those it does not take go free
            self.free_blocks += pinned
            self.cached_blocks -= self.cached.pop(key, 0)
            blocks = pinned
        else:
            blocks = self.cached.pop(key, 0)
            self.cached_blocks -= blocks
        hit = min(blocks, limit // self.block_size)
        if hit:
            self.shared[key] = [hit, 1]
            self.sharing[request] = (key, hit)
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
