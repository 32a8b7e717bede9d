"""The prefix cache's bookkeeping with real mlx-lm KV caches: which stored cache a prompt finds, how
much of it is reused, scopes, and the bounds. (The engine-level behaviour: test_engine.py's
shared system prompt, test_hardening_engine.py's scopes.)"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache

from engine.prompt_cache import BLOCK, PromptCache


def kv(n: int, layers: int = 2) -> list[KVCache]:
    """A cache holding ``n`` tokens (each token's keys carry its position, to see what a trim kept)."""
    out = []
    for _ in range(layers):
        c = KVCache()
        pos = mx.arange(n, dtype=mx.float32).reshape(1, 1, n, 1)
        c.update_and_fetch(pos, pos)
        out.append(c)
    return out


def held(cache: list[KVCache]) -> int:
    return cache[0].offset


SYSTEM = list(range(1000, 1000 + 3 * BLOCK + 5))  # a shared prefix that is not a whole number of blocks


def test_a_prompt_finds_the_longest_shared_prefix_and_gets_a_trimmed_private_copy() -> None:
    pc = PromptCache(max_bytes=1 << 30, max_entries=8)
    first = SYSTEM + [1, 2, 3, 4, 5] + [7] * 20  # prompt and answer
    pc.store(first, kv(len(first)))
    cache, n = pc.lookup(SYSTEM + [9, 9, 9])
    assert n == len(SYSTEM)  # exactly the shared tokens, past the last whole block
    assert held(cache) == len(SYSTEM)
    assert mx.array_equal(cache[0].keys[0, 0, :held(cache), 0], mx.arange(len(SYSTEM), dtype=mx.float32))
    again, n2 = pc.lookup(SYSTEM + [9, 9, 9])
    assert n2 == n and held(again) == n  # the stored entry was not trimmed by the first hit
    assert pc.hits == 2 and pc.lookups == 2


def test_an_exact_or_extended_prompt_leaves_one_token_to_prefill() -> None:
    pc = PromptCache(max_bytes=1 << 30, max_entries=8)
    stored = SYSTEM + [1, 2, 3]
    pc.store(stored, kv(len(stored)))
    _, n = pc.lookup(stored)
    assert n == len(stored) - 1
    _, n = pc.lookup(stored + [4, 5])  # the next turn: the whole stored history is reused
    assert n == len(stored)


def test_a_prefix_shorter_than_a_block_is_not_reused() -> None:
    pc = PromptCache(max_bytes=1 << 30, max_entries=8)
    pc.store(list(range(BLOCK - 1)) + [500] * 40, kv(BLOCK + 39))
    assert pc.lookup(list(range(BLOCK - 1)) + [600] * 40) == (None, 0)
    assert pc.lookup([1, 2, 3]) == (None, 0)
    assert pc.hits == 0 and pc.lookups == 2


def test_scopes_never_see_each_other() -> None:
    pc = PromptCache(max_bytes=1 << 30, max_entries=8)
    pc.store(SYSTEM + [1], kv(len(SYSTEM) + 1), scope="a")
    assert pc.lookup(SYSTEM + [2], scope="b") == (None, 0)
    assert pc.lookup(SYSTEM + [2], scope="a")[1] == len(SYSTEM)


def test_the_best_of_several_candidates_wins() -> None:
    pc = PromptCache(max_bytes=1 << 30, max_entries=8)
    pc.store(SYSTEM + [1] * 30, kv(len(SYSTEM) + 30))
    pc.store(SYSTEM + [2, 3, 4] + [8] * 30, kv(len(SYSTEM) + 33))
    pc.store(SYSTEM + [5] * 30, kv(len(SYSTEM) + 30))
    _, n = pc.lookup(SYSTEM + [2, 3, 4, 6])
    assert n == len(SYSTEM) + 3


def test_entries_and_bytes_are_bounded_least_recently_used_first() -> None:
    pc = PromptCache(max_bytes=1 << 30, max_entries=2)
    a, b, c = ([x] * 40 for x in (1, 2, 3))
    pc.store(a, kv(40))
    pc.store(b, kv(40))
    assert pc.lookup(a + [0])[1] == 40  # a is now the most recently used
    pc.store(c, kv(40))
    assert len(pc) == 2
    assert pc.lookup(b + [0]) == (None, 0)  # b went first
    assert pc.lookup(a + [0])[1] == 40 and pc.lookup(c + [0])[1] == 40

    one = sum(x.nbytes for x in kv(40))
    small = PromptCache(max_bytes=int(one * 1.5), max_entries=10)
    small.store(a, kv(40))
    small.store(b, kv(40))
    assert len(small) == 1 and small.nbytes == one
    assert small.lookup(a + [0]) == (None, 0) and small.lookup(b + [0])[1] == 40


def test_a_longer_sequence_replaces_its_stored_prefixes() -> None:
    pc = PromptCache(max_bytes=1 << 30, max_entries=8)
    turn1 = SYSTEM + [1] * 20
    turn2 = turn1 + [2] * 20
    pc.store(turn1, kv(len(turn1)))
    pc.store(turn2, kv(len(turn2)))
    assert len(pc) == 1 and pc.nbytes == sum(x.nbytes for x in kv(len(turn2)))
    assert pc.lookup(turn1 + [3])[1] == len(turn1)  # served by trimming the longer one
    pc.store(turn2, kv(len(turn2)))  # the same sequence again replaces, never doubles
    assert len(pc) == 1


def test_a_cache_that_cannot_be_trimmed_serves_only_prompts_it_is_a_prefix_of() -> None:
    def untrimmable(n: int) -> list:
        c = ArraysCache(1)
        c[0] = mx.zeros((1, n))
        return [c]

    pc = PromptCache(max_bytes=1 << 30, max_entries=8)
    stored = SYSTEM + [1] * 10
    pc.store(stored, untrimmable(len(stored)))
    assert pc.lookup(SYSTEM + [2]) == (None, 0)  # it would have to give back tokens it cannot
    cache, n = pc.lookup(stored + [3])
    assert n == len(stored) and cache is not None


def test_equal_block_hashes_with_other_tokens_are_no_hit(monkeypatch) -> None:  # noqa: ANN001
    from engine import prompt_cache

    monkeypatch.setattr(prompt_cache, "_block_keys",  # every block of every sequence collides
                        lambda scope, tokens: [(scope, k, 0) for k in range(1, len(tokens) // BLOCK + 1)])
    pc = PromptCache(max_bytes=1 << 30, max_entries=8)
    pc.store(SYSTEM + [1] * 10, kv(len(SYSTEM) + 10))
    assert pc.lookup([7] * 60) == (None, 0)
    assert pc.lookup(SYSTEM + [2])[1] == len(SYSTEM)
