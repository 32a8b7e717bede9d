"""Overload at small scale: a model that takes 4 requests at once, driven at 4x its measured capacity.

The same driver as ``loadtests/overload.py`` (its 2-minute run is in docs/reliability.md): every
answer is 200, 429 or 503 with ``Retry-After``, nothing hangs or ends in an error event, the
replica's memory stays within 10%, and afterwards every request is served again.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ray import serve

from deployments.app import build_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadtests.overload import ray_rss, run  # noqa: E402

APP, PREFIX = "overload", "/overload"


def test_four_times_capacity_degrades_to_429_and_recovers(app_url: str, tiny_model_dir: Path) -> None:
    model = {"name": "ov", "source": str(tiny_model_dir), "num_cpus": 0, "max_ongoing_requests": 4,
             "max_queued_requests": 4, "engine": {"max_batch_size": 4, "max_waiting": 0}}
    serve.run(build_app({"models": [model]}), name=APP, route_prefix=PREFIX)
    try:
        doc = run(app_url + PREFIX, "ov", concurrency=4, capacity_seconds=6.0, seconds=15.0, factor=4.0,
                  max_tokens=16, request_timeout=60.0, max_requests=3000, rss=ray_rss(APP, "model-ov"))
    finally:
        serve.delete(APP)
    over = doc["overload"]["tally"]
    assert doc["capacity"]["requests_per_s"] > 0 and doc["capacity"]["tally"]["statuses"] == {"200": over_cap(doc)}
    assert doc["clean"], doc["problems"]
    assert set(over["statuses"]) <= {"200", "429", "503"} and over["statuses"].get("429", 0) > 0  # it did overload
    assert over["statuses"].get("200", 0) > 0 and over["hung"] == 0 and over["missing_retry_after"] == 0
    assert doc["rss_bytes"]["growth"] is not None and doc["rss_bytes"]["growth"] <= 0.10
    assert len(doc["rss_bytes"]["samples_overload"]) >= 3
    assert doc["recovered"]


def over_cap(doc: dict) -> int:
    """Every request of the capacity phase was served (closed loop at the model's own concurrency)."""
    return doc["capacity"]["tally"]["sent"]
