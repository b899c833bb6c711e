"""Host bookkeeping of a paged KV cache (lmjax.models.kv_cache.PagedKVCache): which page holds
which slots of which lane, which pages hold a prefix that new dialogs can share, which are free.

Prefix sharing works on full pages (as vLLM's automatic prefix caching does): a page whose
`page_size` slots all hold final tokens is registered under a hash of every token from the
start of the dialog to its end, so two dialogs share it exactly when they agree on all of those
tokens (their keys and values are then the same, since a causal model's key at position j
depends on tokens 0..j only). A new dialog reuses the longest run of registered pages that its
prompt starts with and prefills the rest. A lane never writes into a page another lane reads:
writing at a slot that is already filled (rewinding a dialog) first gives the lane its own copy
of a shared page (copy-on-write) and unregisters a page it owns alone.

Pages no lane holds but that are registered stay cached and are reused by later dialogs with
the same prefix (the next turn of a dialog finds its earlier turns there). When the pool runs
short, the least recently used of them are spilled to host memory (the decoder copies them out
before the page is reused) and copied back in when a later dialog's prefix asks for them. A
lane waiting on a tool call is paged out the same way (`page_out`: its full pages are
registered, its last, partly filled page is kept on the host) and back in when it resumes.
Host memory holds every spilled page until its prefix is asked for again (no limit).
"""
import collections
import hashlib

import numpy as np


class CacheFull(RuntimeError):
    """No free page for a slot a lane must write."""


def _chain(key: bytes, tokens) -> bytes:
    return hashlib.blake2b(key + np.asarray(tokens, np.int64).tobytes(), digest_size=16).digest()


class PagePool:
    """Pages of one paged cache: `n_pages` pages of `page_size` slots for `lanes` lanes of
    `pages_per_lane` pages each. `table` is the page table the device reads (`n_pages` = none)."""

    def __init__(self, n_pages: int, page_size: int, lanes: int, pages_per_lane: int, share_prefixes: bool = True):
        self.n_pages, self.page_size, self.share_prefixes = n_pages, page_size, share_prefixes
        self.table = np.full((lanes, pages_per_lane), n_pages, np.int32)
        self.refs = np.zeros(n_pages, np.int32)
        self.free = collections.deque(range(n_pages))
        self.cached = collections.OrderedDict()  # registered pages no lane holds, least recent first
        self.by_key, self.key_of = {}, {}  # prefix hash <-> page
        self.history = [[] for _ in range(lanes)]  # tokens in each lane's filled slots
        self.registered = np.zeros(lanes, np.int32)  # leading pages of each lane already registered
        self.chain = [(0, b"")] * lanes  # (n, hash through the lane's first n pages), so decoding hashes new pages only
        self.changed = True  # the table differs from the device's copy
        # Work for the device before the next call, in this order: copy shared pages a lane will
        # write (copy-on-write), write host pages back in.
        self.copies = []  # (source page, destination page)
        self.restores = []  # (page, (k, v) on the host)
        self.host = {}  # prefix hash -> (k, v) of a spilled page, [layers, kv_heads, page_size, head_dim]
        # page -> its (k, v) on the host, read from the device at once: the decoder sets it
        self.read_page = None
        self.counts = collections.Counter()  # shared, spilled, restored, copied pages

    # -- capacity -------------------------------------------------------------------------------

    def available(self) -> int:
        """Pages a lane could get now: free ones and cached ones that can be evicted."""
        return len(self.free) + len(self.cached)

    def held(self, b: int) -> int:
        return int(np.sum(self.table[b] < self.n_pages))

    def _take(self) -> int:
        if self.free:
            page = self.free.popleft()
        elif self.cached:
            page, _ = self.cached.popitem(last=False)
            key = self.key_of.pop(page)
            del self.by_key[key]
            self.host[key] = self.read_page(page)
            self.counts["spilled"] += 1
        else:
            raise CacheFull("no free page left")
        self.refs[page] = 1
        return page

    def _drop(self, page: int) -> None:
        self.refs[page] -= 1
        if self.refs[page] == 0:
            if page in self.key_of:
                self.cached[page] = None
            else:
                self.free.append(page)

    # -- lanes ----------------------------------------------------------------------------------

    def release(self, b: int) -> None:
        """Lane b holds no page any more (its registered pages stay cached for others)."""
        for page in self.table[b][self.table[b] < self.n_pages]:
            self._drop(int(page))
        self.table[b] = self.n_pages
        self.history[b], self.registered[b], self.chain[b] = [], 0, (0, b"")
        self.changed = True

    def share_prefix(self, b: int, tokens) -> int:
        """Start a new dialog in lane b: release what it held and point its first pages at the
        registered pages its tokens begin with, leaving at least one token to prefill (its
        logits give the first sample). Returns how many slots are already filled."""
        self.release(b)
        if not self.share_prefixes:
            return 0
        n = self._reuse(b, tokens, (len(tokens) - 1) // self.page_size)
        self.history[b] = [int(t) for t in tokens[: n * self.page_size]]
        self.registered[b] = n
        return n * self.page_size

    def _reuse(self, b: int, tokens, limit: int) -> int:
        """Point lane b's first pages at registered pages (on the device, or brought back from
        the host) holding the prefix of `tokens`, at most `limit` pages. Returns how many."""
        P, key, n = self.page_size, b"", 0
        while n < limit:
            key = _chain(key, tokens[n * P:(n + 1) * P])
            page = self.by_key.get(key)
            if page is not None:
                self.cached.pop(page, None)
                self.refs[page] += 1
                self.counts["shared"] += 1
            elif key in self.host and self.available():
                page = self._take()
                self.restores.append((page, self.host.pop(key)))
                self.counts["restored"] += 1
                self.by_key[key], self.key_of[page] = page, key
            else:
                break
            self.table[b, n] = page
            n += 1
        return n

    def prefix_keys(self, tokens, limit: int):
        """The hashes of the first `limit` full pages of `tokens` (none without sharing)."""
        if not self.share_prefixes:
            return []
        keys, key, P = [], b"", self.page_size
        for n in range(min(limit, len(tokens) // P)):
            key = _chain(key, tokens[n * P:(n + 1) * P])
            keys.append(key)
        return keys

    def held_by_a_lane(self, key) -> bool:
        page = self.by_key.get(key)
        return page is not None and self.refs[page] > 0

    # -- paging a waiting lane out and back in --------------------------------------------------

    def page_out(self, b: int):
        """Free lane b's pages while it waits. Returns what `page_in` needs: its tokens and,
        if its last page is partly filled, that page (whose content the caller saves)."""
        if not self.share_prefixes:
            raise ValueError("paging out needs prefix sharing (not available for prefix-LM models)")
        history, P = list(self.history[b]), self.page_size
        tail = self.read_page(int(self.table[b, len(history) // P])) if len(history) % P else None
        self.release(b)
        return history, tail

    def page_in(self, b: int, history, tail_kv) -> None:
        """Lane b holds `history` again: its full pages from the cache or the host, its last
        page from `tail_kv` (k, v on the host, or None when it ended on a page boundary)."""
        P = self.page_size
        full = len(history) // P
        need = full + (tail_kv is not None)
        if self.available() < need:
            raise CacheFull(f"lane {b} needs {need} pages to come back, {self.available()} are free")
        self.release(b)
        if self._reuse(b, history, full) != full:
            raise RuntimeError(f"lane {b}'s pages were lost while it was paged out")
        if tail_kv is not None:
            self.table[b, full] = self._take()
            self.restores.append((int(self.table[b, full]), tail_kv))
        self.history[b], self.registered[b] = [int(t) for t in history], full

    def prepare_write(self, b: int, start: int, stop: int) -> None:
        """Give lane b pages for slots [start, stop), copying a shared page it will write into
        and unregistering one it owns alone. Raises CacheFull when the pool is empty."""
        if stop <= start:
            return
        P = self.page_size
        if start < len(self.history[b]):  # rewinding: what follows is no longer final
            del self.history[b][start:]
            if self.registered[b] > start // P:
                self.registered[b], self.chain[b] = start // P, (0, b"")
        for i in range(start // P, -(-stop // P)):
            page = int(self.table[b, i])
            if page == self.n_pages:
                self.table[b, i] = self._take()
            elif self.refs[page] > 1:
                self.table[b, i] = self._take()
                self.copies.append((page, int(self.table[b, i])))
                self.counts["copied"] += 1
                self._drop(page)
            elif page in self.key_of:
                del self.by_key[self.key_of.pop(page)]
            else:
                continue
            self.changed = True

    def wrote(self, b: int, start: int, tokens) -> None:
        """Slots [start, start + len(tokens)) of lane b now hold `tokens`; register every page
        that became full (when prefixes are shared)."""
        history = self.history[b]
        if start != len(history):
            raise ValueError(f"lane {b} wrote at slot {start} but holds {len(history)} slots")
        history.extend(int(t) for t in tokens)
        if not self.share_prefixes:
            return
        P, n = self.page_size, int(self.registered[b])
        cached_n, key = self.chain[b]
        if cached_n != n:
            key = self._key_through(b, n)
        for i in range(n, len(history) // P):
            key = _chain(key, history[i * P:(i + 1) * P])
            page = int(self.table[b, i])
            if key not in self.by_key and page not in self.key_of:
                self.by_key[key], self.key_of[page] = page, key
            self.registered[b] = i + 1
        self.chain[b] = (int(self.registered[b]), key)

    def _key_through(self, b: int, n: int) -> bytes:
        key = b""
        for i in range(n):
            key = _chain(key, self.history[b][i * self.page_size:(i + 1) * self.page_size])
        return key

    def pop_work(self):
        """(copies, restores) for the device, in that order; the lists are emptied."""
        work = (self.copies, self.restores)
        self.copies, self.restores = [], []
        return work
