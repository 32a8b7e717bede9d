"""Prefix-aware replica routing: a request goes to the replica whose prompt cache likely holds its
prefix (a shared system prompt, the earlier turns of a chat), balanced against load.

Serve's request router picks a replica of one deployment for each request the ingress sends it; the
canary router and sticky sessions choose the deployment (the variant) before that, so both keep
working on top. The policy is Ray Serve LLM's ``PrefixCacheAffinityRouter`` (Ray 2.60, pinned), the
issue's reference design: a prefix tree of the text each replica was sent; when queue lengths differ
by less than ``IMBALANCED_THRESHOLD`` the replica with the longest match wins (or the one holding
the least text when nothing matches 10%), otherwise Serve's power of two choices. Only where it
finds the text differs: here a request is our engine request dict (``messages`` or ``prompt``), not
an OpenAI body. A request with token ids only has no text, so it is routed by load alone.
"""

from __future__ import annotations

from typing import Any

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter
from ray.serve._private.common import ReplicaID

CLASS_PATH = f"{__name__}.PrefixAffinityRouter"
IMBALANCED_THRESHOLD = 2  # queued requests a prefix hit may add over the least loaded replica


def request_text(request: dict[str, Any]) -> str:
    """The text a request's prompt cache entry starts with, in the order the chat template renders it."""
    if request.get("prompt"):
        return str(request["prompt"])
    parts = []
    for m in request.get("messages") or []:
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones
            content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
        parts.append(f"{m.get('role', '')}: {content or ''}\n")
    return "".join(parts)


class PrefixAffinityRouter(PrefixCacheAffinityRouter):
    """Ray's policy with two changes. A request that matches no replica's text well enough takes
    Serve's power of two choices, not the replica holding the least text: a burst of new
    conversations is routed before any of them is in the tree, so that rule put them all on one
    replica. And the prefix tree is asked with ``await``, not ``ray.get``: this runs on the ingress's
    event loop, which relays every stream."""

    def _extract_text_from_request(self, pending_request: Any) -> str:
        for arg in pending_request.args:
            for request in arg if isinstance(arg, list) else [arg]:
                if isinstance(request, dict) and (text := request_text(request)):
                    return text
        return ""

    async def _prefix_match_best_replicas(self, pending_request: Any, candidate_replicas: list[Any]) -> list[list[Any]]:
        text = self._extract_text_from_request(pending_request) if pending_request is not None else ""
        if not text or not await self._balanced(candidate_replicas):
            return [[]]  # Serve's power of two choices
        ids = [r.replica_id.to_full_id_str() for r in candidate_replicas]
        matched, tenants = await self._tree_actor.prefix_match.remote(text, ids)
        if not tenants or len(matched) / len(text) < self._match_rate_threshold:
            return [[]]
        return [[self._replicas[ReplicaID.from_full_id_str(t)] for t in tenants]]

    async def _balanced(self, candidate_replicas: list[Any]) -> bool:
        """Queue lengths differ by at most ``IMBALANCED_THRESHOLD`` (Serve's cached lengths, probed when missing)."""
        lens: list[int] = []
        missing = []
        for r in candidate_replicas:
            q = self._replica_queue_len_cache.get(r.replica_id) if self._use_replica_queue_len_cache else None
            if q is None:
                missing.append(r)
            else:
                lens.append(q)
        if missing:
            lens += [q for _, q in await self._probe_queue_lens(missing, 0) if q is not None]
        return not lens or max(lens) - min(lens) <= self._imbalanced_threshold
