"""The prefix-state cache: model states at block boundaries of prompts already read, reused by later prompts.

An SSM has no per-token cache to slice: a state exists only at the positions where one was kept. The server
therefore keeps, while it reads a prompt, one state per block of ``K = block_tokens`` tokens. To continue from a
state one also needs the logits of its last token (they predict the next one), which a state does not carry, so
the state kept for the prefix ``tokens[:jK]`` is the one *one token before* the boundary, after ``jK - 1``
tokens: a later prompt that begins with those ``jK`` tokens starts there and reads token ``jK - 1`` again along
with whatever follows, which gives the logits for free and costs one token. (Keeping the logits instead would
cost ``V`` floats per entry and a head over every position of every prompt.) A prompt that ends exactly on a kept
boundary reads one token.

Keys chain block hashes, as vLLM's prefix caching does: ``key_0 = H(root)``, ``key_j = H(key_{j-1} || block_j)``,
where ``root`` names the start state the prompt was read from (no state, a skill, a soup: a digest of its
tensors), so a key identifies the whole token prefix *and* what preceded it. Entries are evicted least recently
used first once their bytes exceed the budget. Hit and miss counts are per block (a block is ``K`` tokens, so the
block hit rate is also the token hit rate over cacheable tokens); tokens after a prompt's last full block can never
hit, and prompts shorter than one block are counted apart so that a 0% hit rate has a visible cause.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from statelab.state.core import State

__all__ = ["CachedPrefix", "PrefixCache", "state_digest"]


def state_digest(state: State | None) -> str:
    """A content hash of a batch-1 start state (``"none"`` for no state): the root of the prefix keys.

    Two states with the same tensors, token count and model give the same digest, however they were obtained
    (a stored skill, a soup, a skill re-added under another name), so cached prefixes are shared exactly when
    reading from them gives the same result.
    """
    if state is None:
        return "none"
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{state.arch}|{state.fingerprint}|{state.tokens}|{state.dtype}|".encode())
    for t in (state.ssm, state.conv, state.sum_delta):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class CachedPrefix:
    """One kept boundary: the prefix of ``n_tokens`` prompt tokens (a multiple of the block size).

    Attributes:
        state: batch-1 state after the first ``n_tokens - 1`` tokens of the prefix (its ``tokens`` count the start
            state's tokens too); a reader continues by reading token ``n_tokens - 1`` onwards.
        n_tokens: the prefix length in prompt tokens.
    """

    state: State
    n_tokens: int

    @property
    def nbytes(self) -> int:
        s = self.state
        return sum(t.numel() * t.element_size() for t in (s.ssm, s.conv, s.sum_delta))


class PrefixCache:
    """LRU cache of ``CachedPrefix`` entries by chained block key, bounded by bytes.

    Args:
        max_bytes: budget for the tensors of all entries; ``0`` disables the cache (every lookup misses, nothing
            is kept).
        block_tokens: ``K``, the distance between kept states, in tokens (``>= 1``).

    Thread-safe: the engine thread reads and writes it while ``stats()`` may be called from the HTTP side.
    """

    def __init__(self, max_bytes: int, block_tokens: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
            raise ValueError(f"block_tokens must be an int >= 1, got {block_tokens!r}")
        self.max_bytes = max_bytes
        self.block_tokens = block_tokens
        self._entries: OrderedDict[bytes, CachedPrefix] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.lookups = 0
        self.lookups_with_hit = 0
        self.short_prompts = 0
        self.insertions = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def block_keys(self, root: str, ids: Sequence[int]) -> list[bytes]:
        """Key after each full block of ``ids`` read from the start state named ``root``:
        ``keys[i]`` names the prefix ``ids[: (i + 1) * K]``."""
        K = self.block_tokens
        arr = np.asarray(ids, dtype=np.int64)
        prev = hashlib.blake2b(f"statelab-prefix|{root}".encode(), digest_size=16).digest()
        keys = []
        for i in range(len(arr) // K):
            prev = hashlib.blake2b(prev + arr[i * K : (i + 1) * K].tobytes(), digest_size=16).digest()
            keys.append(prev)
        return keys

    def lookup(self, keys: Sequence[bytes]) -> CachedPrefix | None:
        """The deepest kept prefix among ``keys`` (from ``block_keys``), or ``None``.

        Walks from the first block and stops at the first missing one (a deeper block is useless without the
        blocks before it). Counts one hit per block found and one miss per block not found; marks the found
        entries as recently used.
        """
        with self._lock:
            self.lookups += 1
            if not keys:
                self.short_prompts += 1
                return None
            found: CachedPrefix | None = None
            n = 0
            if self.enabled:
                for key in keys:
                    entry = self._entries.get(key)
                    if entry is None:
                        break
                    self._entries.move_to_end(key)
                    found, n = entry, n + 1
            self.hits += n
            self.misses += len(keys) - n
            self.lookups_with_hit += n > 0
            return found

    def insert(self, key: bytes, entry: CachedPrefix) -> None:
        """Keep ``entry`` under ``key`` (replacing an entry with that key), then evict least recently used entries
        until the budget holds. An entry larger than the whole budget is not kept."""
        size = entry.nbytes
        with self._lock:
            if not self.enabled or size > self.max_bytes:
                return
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = entry
            self._bytes += size
            self.insertions += 1
            while self._bytes > self.max_bytes:
                _, gone = self._entries.popitem(last=False)
                self._bytes -= gone.nbytes
                self.evictions += 1

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by the kept tensors."""
        with self._lock:
            return self._bytes

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> dict[str, Any]:
        """Counters and sizes, for ``/metrics`` and ``/v1/models``."""
        with self._lock:
            looked = self.hits + self.misses
            return {
                "enabled": self.enabled,
                "block_tokens": self.block_tokens,
                "max_bytes": self.max_bytes,
                "bytes": self._bytes,
                "entries": len(self._entries),
                "hits": self.hits,
                "misses": self.misses,
                "hit_rate": self.hits / looked if looked else 0.0,
                "lookups": self.lookups,
                "lookups_with_hit": self.lookups_with_hit,
                "prompts_shorter_than_a_block": self.short_prompts,
                "insertions": self.insertions,
                "evictions": self.evictions,
            }
