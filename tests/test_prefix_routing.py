"""Prefix-aware replica routing (``routing: prefix``): a conversation's later turns go to the replica
that holds its earlier turns in its prompt cache, so they are served from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve

from conftest import no_eos
from deployments.app import build_app
from deployments.routing.prefix_affinity import request_text

APP = "prefix"


def test_request_text_follows_the_rendered_order() -> None:
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url"}]}]}
    assert request_text(chat) == "system: Be brief.\nuser: Hi\n"
    assert request_text({"prompt": "Once upon"}) == "Once upon"
    assert request_text({"prompt_token_ids": [1, 2]}) == ""
    longer = {"messages": chat["messages"] + [{"role": "assistant", "content": "Hello"}]}
    assert request_text(longer).startswith(request_text(chat))  # a conversation's text grows at its end


@pytest.fixture(scope="module")
def prefix_url(app_url: str, tiny_model_dir: Path) -> Any:
    model = {"name": "sticky-cache", "source": str(tiny_model_dir), "num_cpus": 0, "num_replicas": 2,
             "routing": "prefix"}
    serve.run(build_app({"models": [model]}), name=APP, route_prefix="/" + APP)
    yield app_url + "/" + APP
    serve.delete(APP)


def test_later_turns_are_served_from_the_replica_that_cached_the_earlier_ones(prefix_url: str, app_url: str) -> None:
    bias = no_eos(app_url)
    cached: list[int] = []
    with httpx.Client(base_url=prefix_url, timeout=120) as h:
        for user in range(4):
            history = [{"role": "system", "content": f"You are the assistant of user {user}. " + "Be precise. " * 40}]
            for turn in range(3):
                history.append({"role": "user", "content": f"Question {turn} of user {user}?"})
                r = h.post("/v1/chat/completions", json={"model": "sticky-cache", "messages": history,
                                                         "max_tokens": 6, "temperature": 0, "logit_bias": bias})
                assert r.status_code == 200, r.text
                body = r.json()
                if turn > 0:
                    cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
                history.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
    # Every later turn found its conversation's prefix: with two replicas picked by load alone, about
    # half would land where nothing of it is cached (8 turns all hitting by chance: 1 in 256).
    assert len(cached) == 8 and all(c > 100 for c in cached), cached
