"""The vision path without the scheduler: ``engine.images`` limits and ``engine.vision.VisionBatch``
driven directly (on this test thread, which creates every MLX stream it uses) with the demo qwen2_vl."""

from __future__ import annotations

import base64
import http.server
import io
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.errors import InvalidRequestError  # noqa: E402
from engine.images import ImagePolicy, decode_image_bytes, load_image  # noqa: E402
from engine.request import ChatMessage, SamplingParams  # noqa: E402
from engine.sampling import make_processors, make_sampler  # noqa: E402


# -- helpers -------------------------------------------------------------------------------------
def png_bytes(size: tuple[int, int], seed: int, fmt: str = "PNG") -> bytes:
    w, h = size
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")).save(buf, format=fmt)
    return buf.getvalue()


def data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height``, with a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
            + chunk(b"IEND", b""))


def user(text: str, *urls: str) -> ChatMessage:
    return ChatMessage(role="user", content=[*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                             {"type": "text", "text": text}])


def rejects(code: str, fn: Any, *args: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as e:
        fn(*args)
    assert e.value.code == code, (e.value.code, e.value.message)
    assert e.value.param == "messages" and e.value.kind == "invalid"
    return e.value


# -- engine.images ---------------------------------------------------------------------------------
POLICY = ImagePolicy()


def test_data_uri_decodes_to_rgb() -> None:
    img = load_image(data_uri(png_bytes((40, 30), 1)), POLICY)
    assert img.size == (40, 30) and img.mode == "RGB"
    rgba = io.BytesIO()
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(rgba, format="PNG")
    assert load_image(data_uri(rgba.getvalue()), POLICY).mode == "RGB"


def test_broken_or_foreign_data_is_invalid_image() -> None:
    rejects("invalid_image", load_image, "data:image/png;base64,@@not*base64@@", POLICY)
    rejects("invalid_image", load_image, data_uri(b"just some text, not an image"), POLICY)
    rejects("invalid_image", load_image, data_uri(png_bytes((40, 30), 1), "text/plain"), POLICY)
    rejects("invalid_image", load_image, "data:image/png;base64", POLICY)
    rejects("invalid_image", load_image, data_uri(png_bytes((64, 64), 1)[:200]), POLICY)  # truncated
    rejects("invalid_image", load_image, data_uri(png_bytes((16, 16), 1, "TIFF")), POLICY)  # not in formats
    assert load_image(data_uri(png_bytes((16, 16), 1, "TIFF")), ImagePolicy(formats=["TIFF"])).size == (16, 16)


def test_size_limits_are_checked_before_decoding() -> None:
    e = rejects("image_too_large", load_image, data_uri(png_bytes((64, 64), 1)), ImagePolicy(max_pixels=64 * 63))
    assert "64x64" in e.message
    # A header claiming 100k x 100k pixels and no data: refused from the header (never allocated),
    # whether our limit or PIL's decompression-bomb guard is the lower one.
    rejects("image_too_large", load_image, data_uri(png_header_only(5000, 5000)), POLICY)  # ours
    bomb = data_uri(png_header_only(100_000, 100_000))
    rejects("image_too_large", load_image, bomb, POLICY)
    rejects("image_too_large", load_image, bomb, ImagePolicy(max_pixels=10**12))  # PIL's
    rejects("image_too_large", load_image, data_uri(png_bytes((64, 64), 1)), ImagePolicy(max_bytes=1000))
    rejects("image_too_large", decode_image_bytes, b"x" * 2000, ImagePolicy(max_bytes=1000))


def test_local_files_only_under_allowed_directories(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "a.png").write_bytes(png_bytes((20, 10), 1))
    (outside / "b.png").write_bytes(png_bytes((20, 10), 2))
    (allowed / "link.png").symlink_to(outside / "b.png")
    policy = ImagePolicy(allowed_local_dirs=[str(allowed)])

    assert load_image(str(allowed / "a.png"), policy).size == (20, 10)
    assert load_image((allowed / "a.png").as_uri(), policy).size == (20, 10)
    rejects("image_url_not_allowed", load_image, str(allowed / "a.png"), POLICY)  # no directories allowed
    rejects("image_url_not_allowed", load_image, str(outside / "b.png"), policy)
    rejects("image_url_not_allowed", load_image, f"{allowed}/../outside/b.png", policy)
    rejects("image_url_not_allowed", load_image, str(allowed / "link.png"), policy)  # symlink out
    rejects("image_url_not_allowed", load_image, "file://otherhost" + str(allowed / "a.png"), policy)
    rejects("invalid_image", load_image, str(allowed / "missing.png"), policy)
    rejects("image_too_large", load_image, str(allowed / "a.png"),
            ImagePolicy(allowed_local_dirs=[str(allowed)], max_bytes=100))
    with pytest.raises(ValueError):
        ImagePolicy(allowed_local_dirs=["relative/dir"])


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/redirect-to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
            return
        body = png_bytes((32, 16), 3) if self.path == "/img.png" else png_bytes((256, 256), 4)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_remote_urls_only_when_enabled() -> None:
    rejects("image_url_not_allowed", load_image, "http://127.0.0.1:9/img.png", POLICY)
    rejects("image_url_not_allowed", load_image, "https://example.com/img.png", POLICY)
    rejects("image_url_not_allowed", load_image, "ftp://example.com/img.png", ImagePolicy(allow_remote=True))
    rejects("image_url_not_allowed", load_image, "relative/path.png", POLICY)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    remote = ImagePolicy(allow_remote=True, fetch_timeout_s=5, allowed_remote_networks=["127.0.0.0/8"])
    try:
        assert load_image(f"{base}/img.png", remote).size == (32, 16)
        rejects("image_url_not_allowed", load_image, f"{base}/img.png", ImagePolicy(allow_remote=True))  # loopback
        rejects("image_url_not_allowed", load_image, f"{base}/redirect-to-file", remote)
        rejects("image_too_large", load_image, f"{base}/big.png", remote.model_copy(update={"max_bytes": 10_000}))
        rejects("image_fetch_failed", load_image, "http://127.0.0.1:9/img.png", remote)  # nothing listens
    finally:
        server.shutdown()
        server.server_close()


# -- engine.vision: rendering and preprocessing ------------------------------------------------------
@pytest.fixture(scope="module")
def vlm(vision_model_dir: Path) -> Any:
    from engine.vision import load_vision_model

    m = load_vision_model("demo-vision", str(vision_model_dir), {
        "max_batch_size": 8, "prefill_batch_size": 4, "prefill_step_size": 512})
    yield m
    m.batch.close()


def new_batch(vlm: Any, **kw: int) -> Any:
    from engine.vision import VisionBatch

    args = {"max_batch_size": 8, "prefill_batch_size": 4, "prefill_step_size": 512, **kw}
    return VisionBatch(vlm.model, vlm.batch.processor, sorted(vlm.eos_ids), **args)


def prep(vlm: Any, *messages: ChatMessage, policy: ImagePolicy = POLICY) -> Any:
    from engine.vision import prepare_vision_inputs

    return prepare_vision_inputs(vlm.batch.processor, vlm.model.config, list(messages), policy)


IMG_A = data_uri(png_bytes((64, 64), 1))
IMG_B = data_uri(png_bytes((64, 64), 2))
IMG_WIDE = data_uri(png_bytes((96, 64), 3))


def test_loaded_model_fields(vlm: Any) -> None:
    tok = vlm.tokenizer
    assert vlm.eos_ids == {tok.convert_tokens_to_ids("<|im_end|>")}
    assert vlm.vocab_size == len(tok) == 1024
    assert vlm.nbytes > 0 and vlm.context_length > 0
    d1, d2 = tok.detokenizer, tok.detokenizer  # a fresh streaming detokenizer per sequence
    assert d1 is not d2
    ids = tok.encode("Hello there", add_special_tokens=False)
    assert tok.decode(ids) == "Hello there"


def test_prompt_carries_the_image_tokens(vlm: Any) -> None:
    from mlx_vlm.utils import estimate_num_image_tokens

    cfg, processor = vlm.model.config, vlm.batch.processor
    vi = prep(vlm, user("Describe this.", IMG_A))
    assert vi.num_images == 1 and vi.prompt.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    grid = vi.model_inputs["image_grid_thw"].tolist()
    assert grid == [[1, 4, 4]]
    n_pad = vi.input_ids.count(cfg.image_token_id)
    merge = processor.image_processor.merge_size
    assert n_pad == estimate_num_image_tokens(processor, 64, 64) == int(np.prod(grid[0])) // merge**2 == 4
    wide = prep(vlm, user("Describe this.", IMG_WIDE))
    assert wide.input_ids.count(cfg.image_token_id) == estimate_num_image_tokens(processor, 64, 96) == 6
    # Two images, interleaved with text, across turns; each keeps its place.
    two = prep(vlm, user("first", IMG_A), ChatMessage(role="assistant", content="ok"), user("second", IMG_WIDE))
    assert two.num_images == 2 and two.input_ids.count(cfg.image_token_id) == 4 + 6
    assert two.prompt.index("first") < two.prompt.index("second")
    # Text only: no image tokens at all.
    text = prep(vlm, ChatMessage(role="user", content="Hello there"))
    assert text.num_images == 0 and cfg.image_token_id not in text.input_ids


def test_bad_requests_fail_before_the_gpu_thread(vlm: Any) -> None:
    from engine.vision import prepare_vision_inputs

    processor, cfg = vlm.batch.processor, vlm.model.config
    rejects("too_many_images", prepare_vision_inputs, processor, cfg, [user("x", IMG_A, IMG_B, IMG_A)],
            ImagePolicy(max_images=2))
    rejects("invalid_image", prepare_vision_inputs, processor, cfg,
            [ChatMessage(role="assistant", content=[{"type": "image_url", "image_url": {"url": IMG_A}}])], POLICY)
    rejects("invalid_image", prepare_vision_inputs, processor, cfg, [user("x", "data:image/png;base64,AAAA")], POLICY)
    rejects("image_url_not_allowed", prepare_vision_inputs, processor, cfg, [user("x", "http://10.0.0.1/a.png")],
            POLICY)


# -- engine.vision: the batch ------------------------------------------------------------------------
def run(batch: Any, jobs: list[tuple[Any, int, Any, list]], join_after: int = 0) -> list[dict[str, Any]]:
    """Insert ``jobs`` (prompt, max_tokens, sampler, processors); with ``join_after`` the first job
    runs that many steps before the others join. Returns each job's tokens, logprobs, finish reason."""
    res: list[dict[str, Any]] = [{"tokens": [], "logprobs": [], "finish": None} for _ in jobs]
    by_uid: dict[int, int] = {}

    def add(i: int) -> None:
        by_uid[batch.insert(*jobs[i])] = i

    def step() -> None:
        for r in batch.step():
            out = res[by_uid[r.uid]]
            out["tokens"].append(r.token)
            out["logprobs"].append(r.logprobs)
            out["finish"] = r.finish_reason

    add(0)
    for _ in range(join_after):
        step()
    for i in range(1, len(jobs)):
        add(i)
    for _ in range(1000):
        if len(batch) == 0:
            break
        step()
    assert len(batch) == 0
    return res


def test_two_images_give_different_outputs(vlm: Any) -> None:
    batch = new_batch(vlm)
    try:
        a, b = run(batch, [(prep(vlm, user("Describe this.", IMG_A)), 6, None, []),
                           (prep(vlm, user("Describe this.", IMG_B)), 6, None, [])])
    finally:
        batch.close()
    # Same prompt text, same image size, only the pixels differ: the first logits differ.
    assert float(mx.abs(a["logprobs"][0] - b["logprobs"][0]).max()) > 1e-3
    assert a["tokens"] != b["tokens"]


def test_text_only_requests_work_both_ways(vlm: Any) -> None:
    vi = prep(vlm, ChatMessage(role="user", content="Hello there, how are you?"))
    batch = new_batch(vlm)
    try:
        via_inputs, via_ids = run(batch, [(vi, 8, None, []), (list(vi.input_ids), 8, None, [])])
    finally:
        batch.close()
    assert via_inputs["tokens"] == via_ids["tokens"] and len(via_inputs["tokens"]) > 0
    assert via_inputs["finish"] in ("stop", "length")
    assert isinstance(vlm.tokenizer.decode(via_inputs["tokens"]), str)


def test_batch_equals_each_request_alone(vlm: Any) -> None:
    """Images of different sizes, two images in one request, and a text-only request decode together,
    admitted while another is decoding, with exactly the greedy tokens each gets alone."""
    msgs = [
        [user("Describe this.", IMG_A)],
        [user("What is in the picture?", IMG_WIDE)],
        [ChatMessage(role="user", content="Hello there!")],
        [user("Compare these two.", IMG_B, IMG_WIDE)],
    ]
    n = 10
    alone = []
    for m in msgs:
        batch = new_batch(vlm)
        try:
            alone.append(run(batch, [(prep(vlm, *m), n, None, [])])[0])
        finally:
            batch.close()
    assert len({tuple(a["tokens"]) for a in alone}) == len(msgs)  # the comparison is not vacuous

    batch = new_batch(vlm, prefill_batch_size=2)  # the joiners prefill in two groups
    try:
        together = run(batch, [(prep(vlm, *m), n, None, []) for m in msgs], join_after=3)
    finally:
        batch.close()
    for got, want in zip(together, alone):
        assert got["tokens"] == want["tokens"]
        assert got["finish"] == want["finish"]
        for lp_got, lp_want in zip(got["logprobs"], want["logprobs"]):
            assert float(mx.abs(lp_got - lp_want).max()) < 1e-3


def test_logprobs_are_real_and_processors_apply_per_request(vlm: Any) -> None:
    forced = vlm.tokenizer.convert_tokens_to_ids("<|box_start|>")
    bias = make_processors(SamplingParams(logit_bias={forced: 100.0}))
    batch = new_batch(vlm)
    try:
        free, biased = run(batch, [(prep(vlm, user("Describe this.", IMG_A)), 5, None, []),
                                   (prep(vlm, user("Describe this.", IMG_A)), 5, None, bias)])
    finally:
        batch.close()
    assert biased["tokens"] == [forced] * 5
    assert free["tokens"] != biased["tokens"]
    for tok, lp in zip(free["tokens"], free["logprobs"]):
        assert lp.shape[-1] == vlm.vocab_size
        assert abs(float(mx.exp(lp).sum()) - 1.0) < 1e-3  # a distribution, not the argmax mask
        assert int(mx.argmax(lp.reshape(-1))) == tok and float(lp.reshape(-1)[tok]) < 0.0
    assert float(biased["logprobs"][0].reshape(-1)[forced]) > -1e-3  # after the processor


def test_structured_output_in_the_same_batch(vlm: Any) -> None:
    import json

    from engine.structured import compiler_for

    schema = {"type": "object", "required": ["color", "n"], "properties": {
        "color": {"enum": ["red", "green"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99}}}
    grammar = compiler_for(vlm.tokenizer, vlm.vocab_size).compile({"kind": "json_schema", "schema": schema})
    batch = new_batch(vlm)
    try:
        free, constrained, lean = run(batch, [
            (prep(vlm, user("Describe this.", IMG_A)), 12, None, []),
            (prep(vlm, user("Describe this as JSON.", IMG_WIDE)), 40, None, [grammar.make_processor()]),
            (prep(vlm, user("Describe this.", IMG_A)), 12, None, []),
        ])
    finally:
        batch.close()
    assert constrained["finish"] == "stop" and constrained["tokens"][-1] in vlm.eos_ids
    value = json.loads(vlm.tokenizer.decode(constrained["tokens"][:-1]))
    assert value["color"] in ("red", "green") and isinstance(value["n"], int)
    assert lean["tokens"] == free["tokens"]


def test_greedy_without_logprobs_and_chunked_prefill(vlm: Any) -> None:
    jobs = [(user("What is in the picture?", IMG_WIDE), 8), (user("Compare these two.", IMG_B, IMG_A), 8)]
    batch = new_batch(vlm)
    try:
        want = run(batch, [(prep(vlm, m), n, None, []) for m, n in jobs])
    finally:
        batch.close()
    batch = new_batch(vlm, prefill_step_size=16)  # prompts of 30-40 tokens prefill in chunks
    try:
        by_uid = {batch.insert(prep(vlm, m), n, None, [], keep_logprobs=False): i for i, (m, n) in enumerate(jobs)}
        got: list[list[int]] = [[] for _ in jobs]
        while len(batch):
            for r in batch.step():
                assert r.logprobs is None
                got[by_uid[r.uid]].append(r.token)
    finally:
        batch.close()
    assert got == [w["tokens"] for w in want]


def test_seeded_sampling_is_batch_independent_and_cancel_leaves_others(vlm: Any) -> None:
    def jobs(names: list[str]) -> list[tuple]:
        spec = {
            "seeded": (user("Describe this.", IMG_A), SamplingParams(temperature=1.0, seed=7)),
            "greedy": (user("What is in the picture?", IMG_WIDE), SamplingParams(temperature=0.0)),
            "other": (ChatMessage(role="user", content="Hello there!"), SamplingParams(temperature=1.0, seed=9)),
        }
        return [(prep(vlm, spec[n][0]), 10, make_sampler(spec[n][1]), []) for n in names]

    batch = new_batch(vlm)
    try:
        seeded_alone, greedy_alone = run(batch, jobs(["seeded", "greedy"]))
        # Again, in another order with another sampled request that is cancelled after 3 tokens.
        names = ["greedy", "other", "seeded"]
        by_uid = {batch.insert(*j): n for j, n in zip(jobs(names), names)}
        out: dict[str, list[int]] = {n: [] for n in by_uid.values()}
        while len(batch):
            for r in batch.step():
                out[by_uid[r.uid]].append(r.token)
            if len(out["other"]) == 3 and "other" in by_uid.values():
                uid = next(u for u, n in by_uid.items() if n == "other")
                batch.remove([uid])
                del by_uid[uid]
                assert len(batch) == 2
        batch.remove([12345])  # unknown uids are ignored
    finally:
        batch.close()
    assert out["seeded"] == seeded_alone["tokens"]
    assert out["greedy"] == greedy_alone["tokens"]
    assert seeded_alone["tokens"] != greedy_alone["tokens"]
    assert len(out["other"]) == 3


def test_insert_frees_the_images_and_counts_prompt_tokens(vlm: Any) -> None:
    vi = prep(vlm, user("Describe this.", IMG_A))
    n = len(vi.input_ids)
    batch = new_batch(vlm)
    try:
        uid = batch.insert(vi, 2, None, [])
        assert batch.prompt_tokens(uid) == n
        assert vi.images == [] and vi.model_inputs is None and vi.num_images == 1
        with pytest.raises(ValueError):
            batch.insert([1, 2, 3], 2, None, [], cache=[object()])
        batch.remove([uid])
        assert len(batch) == 0
    finally:
        batch.close()


def test_preprocessing_may_be_left_to_the_gpu_thread(vlm: Any) -> None:
    from engine.vision import prepare_vision_inputs

    eager = prep(vlm, user("Describe this.", IMG_WIDE))
    lazy = prepare_vision_inputs(vlm.batch.processor, vlm.model.config, [user("Describe this.", IMG_WIDE)],
                                 POLICY, preprocess=False)
    assert not lazy.prepared and lazy.input_ids == []
    batch = new_batch(vlm)
    try:
        a, b = run(batch, [(eager, 6, None, []), (lazy, 6, None, [])])
    finally:
        batch.close()
    assert a["tokens"] == b["tokens"]


def test_preprocessing_on_another_thread_leaves_nothing_lazy(vlm: Any) -> None:
    """The caller's thread builds MLX arrays in the processor; the GPU thread (this one) uses them."""
    box: dict[str, Any] = {}

    def caller() -> None:
        try:
            box["vi"] = prep(vlm, user("Describe this.", IMG_A))
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=caller)
    t.start()
    t.join()
    assert "error" not in box, box.get("error")
    batch = new_batch(vlm)
    try:
        (res,) = run(batch, [(box["vi"], 4, None, [])])
    finally:
        batch.close()
    assert len(res["tokens"]) > 0


def test_warmup_runs(vlm: Any) -> None:
    from engine.models import warmup
    from engine.vision import warmup_vision

    warmup(vlm)  # the text warm-up inserts plain token ids
    warmup_vision(vlm)
    assert len(vlm.batch) == 0
