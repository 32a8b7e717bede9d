"""lm-evaluation-harness's ``local-completions`` model against the served demo model, offline.

The task files live in ``tests/lm_eval_task/`` (a JSONL of 12 questions, a multiple-choice task and a
log-likelihood task). lm-eval runs as its own process, the way a user runs it, from the repository
root (the tasks name their JSONL relative to it), with the hub and dataset downloads switched off.
What lm-eval sends to ``/v1/completions`` for log-likelihoods (lm-eval 0.4.13):
``{"prompt": [[ids...], ...] | [str, ...] | str, "echo": true, "logprobs": 1, "max_tokens": 1,
"temperature": 0, "seed": 1234}``; from each choice (sorted by ``index``, one per prompt, in prompt
order) it sums ``logprobs.token_logprobs[ctxlen:-1]`` (the prompt's continuation tokens: the last entry
is the one generated token) and calls the continuation greedy when each of those equals
``max(top_logprobs[i].values())``.

Then the test asks the server itself, with ``max_tokens: 0``, for the same token ids and checks that the
sums lm-eval reported are the server's prompt logprobs.
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
TASK_DIR = REPO / "tests" / "lm_eval_task"
TASKS = ("mlx_serving_mc", "mlx_serving_loglik")
N_DOCS = sum(1 for line in (TASK_DIR / "questions.jsonl").read_text().splitlines() if line.strip())


def run_lm_eval(base_url: str, tokenizer_dir: Path, out: Path, *, model_args: str = "",
                batch_size: int = 4) -> tuple[dict, dict[str, list[dict]]]:
    """Run ``lm_eval run`` on both local tasks; return its results and its logged samples per task."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(out / "datasets-cache"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OPENAI_API_KEY", None)
    args = (f"base_url={base_url}/v1/completions,model=demo,tokenizer_backend=huggingface,"
            f"tokenizer={tokenizer_dir},max_retries=1,timeout=120" + (f",{model_args}" if model_args else ""))
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", args,
           "--batch_size", str(batch_size), "--tasks", ",".join(TASKS), "--include_path", str(TASK_DIR),
           "--log_samples", "--output_path", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"lm-eval failed ({proc.returncode}):\n{log[-6000:]}"
    # lm-eval retries a failed request (max_retries) and logs a warning: every request must succeed first time.
    assert "API request failed" not in log and "retrying" not in log.lower(), log[-6000:]
    results = json.loads(Path(sorted(glob.glob(str(out / "demo" / "results_*.json")))[-1]).read_text())
    samples = {}
    for task in TASKS:
        (path,) = glob.glob(str(out / "demo" / f"samples_{task}_*.jsonl"))
        samples[task] = sorted((json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()),
                               key=lambda s: s["doc_id"])
    return results, samples


def pairs(sample: dict) -> list[tuple[str, str, float, bool]]:
    """(context, continuation, log-likelihood, is_greedy) for each request lm-eval made for one doc."""
    out = []
    args = sample["arguments"]
    for i, resp in enumerate(sample["resps"]):
        a = args[f"gen_args_{i}"]
        ll, greedy = resp[0]
        out.append((a["arg_0"], a["arg_1"], float(ll), str(greedy) == "True"))
    return out


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-3)


def test_lm_eval_local_completions_scores_match_the_server(app_url: str, tiny_model_dir: Path,
                                                            tmp_path: Path) -> None:
    import lm_eval  # noqa: F401  (a missing lm-eval fails this test; it is a dev dependency)
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    # 1. Token-id prompts, batched four to a request: {"prompt": [[ids], [ids], ...]} (lm-eval's default).
    results, samples = run_lm_eval(app_url, tiny_model_dir, tmp_path / "tokens", batch_size=4)
    for task in TASKS:
        r = results["results"][task]
        assert r["sample_len"] == N_DOCS and len(samples[task]) == N_DOCS
        assert 0.0 <= r["acc,none"] <= 1.0, r
    mc = results["results"]["mlx_serving_mc"]
    assert 0.0 <= mc["acc_norm,none"] <= 1.0
    # acc is what the per-choice log-likelihoods say
    right = [max(range(len(s["doc"]["choices"])), key=lambda i: pairs(s)[i][2]) == s["doc"]["label"]
             for s in samples["mlx_serving_mc"]]
    assert math.isclose(mc["acc,none"], sum(right) / N_DOCS)
    for s in samples["mlx_serving_mc"]:
        assert len(s["resps"]) == len(s["doc"]["choices"])
    ll = results["results"]["mlx_serving_loglik"]
    assert math.isfinite(ll["perplexity,none"]) and ll["perplexity,none"] >= 1.0

    # 2. The server, asked directly, gives the same numbers: the prompt's tokens scored with max_tokens 0.
    lm = LocalCompletionsAPI(base_url=app_url + "/v1/completions", model="demo", tokenizer_backend="huggingface",
                             tokenizer=str(tiny_model_dir))
    checked = 0
    with httpx.Client(base_url=app_url, timeout=120) as h:
        for task in TASKS:
            for s in samples[task]:
                for context, continuation, lm_ll, lm_greedy in pairs(s):
                    ctx, cont = lm._encode_pair(context, continuation)
                    ids = ctx + cont
                    r = h.post("/v1/completions", json={"model": "demo", "prompt": ids, "echo": True, "logprobs": 1,
                                                        "max_tokens": 0, "temperature": 0})
                    assert r.status_code == 200, r.text
                    body = r.json()
                    (choice,) = body["choices"]
                    lp = choice["logprobs"]
                    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids)
                    assert lp["token_logprobs"][0] is None  # nothing predicts the first token
                    assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
                    assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == 0
                    assert choice["text"] == lm.tokenizer.decode(ids)  # echo of a token prompt: its text
                    scored = lp["token_logprobs"][len(ctx):]
                    assert close(sum(scored), lm_ll), (task, s["doc_id"], context, continuation, sum(scored), lm_ll)
                    tops = lp["top_logprobs"][len(ctx):]
                    assert all(tok <= max(top.values()) + 1e-6 for tok, top in zip(scored, tops))
                    assert all(tok == max(top.values()) for tok, top in zip(scored, tops)) == lm_greedy
                    checked += 1
    assert checked == sum(len(pairs(s)) for t in TASKS for s in samples[t])

    # 3. String prompts, three to a request, two requests in flight (lm-eval's async path):
    #    {"prompt": ["text", ...]}; the server's tokenization must give the same scores.
    results_s, samples_s = run_lm_eval(app_url, tiny_model_dir, tmp_path / "strings", batch_size=3,
                                       model_args="tokenized_requests=False,num_concurrent=2")
    for task in TASKS:
        for a, b in zip(samples[task], samples_s[task]):
            for (c1, k1, l1, g1), (c2, k2, l2, g2) in zip(pairs(a), pairs(b)):
                assert (c1, k1) == (c2, k2)
                assert close(l1, l2), (task, a["doc_id"], c1, k1, l1, l2)
                assert g1 == g2
    assert math.isclose(results_s["results"]["mlx_serving_mc"]["acc,none"], mc["acc,none"])
