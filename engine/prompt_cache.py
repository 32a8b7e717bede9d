"""Prefix cache: reuse the KV cache of a prompt's longest known prefix (system prompt, earlier turns).

mlx-lm's ``LRUPromptCache`` keeps caches in a token trie, bounded by entries and bytes, and trims a
longer cache down to a shared prefix where the cache type allows. Finished sequences are stored
under every token their cache holds, so the next turn of a chat finds its history. GPU thread only.

Entries live in scopes (the request's ``cache_scope``: one per API key and ``cache_salt``) and are
found only from the same scope, so a hit (``cached_tokens``, a short TTFT) tells a tenant nothing
about another tenant's prompts. The byte and entry bounds are shared by all scopes.
"""

from __future__ import annotations

from typing import Any

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache


class PromptCache:
    def __init__(self, max_bytes: int, max_entries: int) -> None:
        self._lru = LRUPromptCache(max_size=max_entries, max_bytes=max_bytes)
        self.hits = 0
        self.lookups = 0

    def lookup(self, prompt: list[int], scope: str = "") -> tuple[list[Any] | None, int]:
        """(a private copy of the KV cache for ``prompt[:n]``, n); (None, 0) on a miss.

        At least one prompt token is always left to prefill: generation starts from a fresh forward pass.
        """
        self.lookups += 1
        cache, rest = self._lru.fetch_nearest_cache(scope, prompt)
        if cache is None:
            return None, 0
        if not rest:
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        self.hits += 1
        return cache, len(prompt) - len(rest)

    def store(self, tokens: list[int], cache: list[Any], scope: str = "") -> None:
        if tokens and cache:
            self._lru.insert_cache(scope, list(tokens), cache)

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def __len__(self) -> int:
        return len(self._lru)
