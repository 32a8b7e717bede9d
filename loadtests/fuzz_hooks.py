"""Schemathesis hooks for fuzzing the OpenAI API of a running server (see docs/reliability.md).

Bodies name a model that exists (``FUZZ_MODEL``, default ``demo``), so generated requests reach the
engine instead of stopping at 404, and generation stays short. One extra check: every error answer
is an OpenAI error object (``{"error": {"message", "type", "param", "code"}}``).

    SCHEMATHESIS_HOOKS=loadtests.fuzz_hooks st run http://127.0.0.1:8000/openapi.json \\
        --checks not_a_server_error,openai_error_body --max-examples 200
"""

from __future__ import annotations

import json
import os

import schemathesis

MODEL = os.environ.get("FUZZ_MODEL", "demo")
MAX_TOKENS = 8


@schemathesis.hook
def map_body(ctx, body):  # noqa: ANN001, ANN201 - schemathesis' hook signature
    if isinstance(body, dict):
        if "model" in body:
            body["model"] = MODEL
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] > MAX_TOKENS:
                body[key] = MAX_TOKENS
    return body


@schemathesis.check
def openai_error_body(ctx, response, case):  # noqa: ANN001, ANN201
    if response.status_code < 400:
        return None
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"{response.status_code} without an OpenAI error object: {response.content[:200]!r}")
    missing = {"message", "type", "param", "code"} - set(error)
    if missing:
        raise AssertionError(f"error object lacks {sorted(missing)}")
    if response.status_code >= 500 and "Traceback" in error["message"]:
        raise AssertionError("a 5xx echoes internal exception text")
    return None
