"""Prefix-aware replica routing: a request goes to the replica whose prompt cache likely holds its
prefix (a shared system prompt, the earlier turns of a chat), balanced against load.

Serve's request router picks a replica of one deployment for each request the ingress sends it; the
canary router and sticky sessions choose the deployment (the variant) before that, so both keep
working on top. The policy is Ray Serve LLM's ``PrefixCacheAffinityRouter`` (Ray 2.60, pinned), the
issue's reference design: a prefix tree of the text each replica was sent; when queue lengths differ
by less than ``imbalanced_threshold`` the replica with the longest match wins (or the one holding
the least text when nothing matches 10%), otherwise Serve's power of two choices. Only where it
finds the text differs: here a request is our engine request dict (``messages`` or ``prompt``), not
an OpenAI body. A request with token ids only has no text, so it is routed by load alone.
"""

from __future__ import annotations

from typing import Any

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter

CLASS_PATH = f"{__name__}.PrefixAffinityRouter"


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
    def _extract_text_from_request(self, pending_request: Any) -> str:
        for arg in pending_request.args:
            for request in arg if isinstance(arg, list) else [arg]:
                if isinstance(request, dict) and (text := request_text(request)):
                    return text
        return ""
