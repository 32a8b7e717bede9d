"""Issue 12, items 3 (pixel budget, image tokens before decoding) and 6 (SSRF-safe remote fetch).

Every server here listens on 127.0.0.0/8 (127.0.0.1 and 127.0.0.2, both loopback on Linux); no test
contacts any other address. Literal internal addresses are only resolved (numeric, no DNS), and the
tests that use them fail if a connection is even attempted.
"""

from __future__ import annotations

import base64
import datetime
import http.server
import io
import ipaddress
import os
import socket
import ssl
import threading
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from PIL import Image, ImageFile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine import image_fetch as images_mod  # noqa: E402
from engine.errors import InvalidRequestError  # noqa: E402
from engine.images import ImagePolicy, load_image, open_request_images  # noqa: E402
from engine.request import ChatMessage  # noqa: E402

LOOPBACK = ["127.0.0.0/8"]


# -- helpers ---------------------------------------------------------------------------------------
def png_bytes(size: tuple[int, int], seed: int = 1) -> bytes:
    w, h = size
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(text: str, *urls: str) -> ChatMessage:
    return ChatMessage(role="user", content=[*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                             {"type": "text", "text": text}])


def rejects(code: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as e:
        fn(*args, **kwargs)
    assert e.value.code == code, (e.value.code, e.value.message)
    assert e.value.param == "messages" and e.value.kind == "invalid"
    return e.value


IMAGE = png_bytes((32, 16), 3)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes: /img.png; /to?url=U (302 to U); /chain/N (N redirects, then the image); /loop (redirects
    forever); /drip-body and /drip-head (one byte every 0.2 s); /slow-redirect (0.4 s, then to itself);
    /big and /big-unsized (over the byte limit, with and without Content-Length)."""

    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.hits.append(self.path)
        self.server.hosts.append(self.headers.get("Host", ""))
        path, _, query = self.path.partition("?")
        try:
            if path == "/img.png":
                self._send(200, IMAGE)
            elif path == "/to":
                self._redirect(urllib.parse.parse_qs(query)["url"][0])
            elif path.startswith("/chain/"):
                n = int(path.rsplit("/", 1)[1])
                self._send(200, IMAGE) if n == 0 else self._redirect(f"/chain/{n - 1}")
            elif path == "/loop":
                self._redirect("/loop")
            elif path == "/slow-redirect":
                time.sleep(0.4)
                self._redirect("/slow-redirect")
            elif path == "/drip-body":
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self._drip(b"\x89PNG" + b"\x00" * 99996)
            elif path == "/drip-head":
                self._drip(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 1000 + b"\r\n\r\n")
            elif path == "/big":
                self._send(200, b"\x00" * 20_000)
            elif path == "/big-unsized":
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(b"\x00" * 20_000)
            else:
                self._send(404, b"not here")
        except OSError:  # the client hung up (deadline tests): nothing to do
            pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _drip(self, data: bytes) -> None:
        for i in range(len(data)):
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            time.sleep(0.2)

    def log_message(self, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str) -> None:
        super().__init__((host, 0), _Handler)
        self.hits: list[str] = []
        self.hosts: list[str] = []

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def base(self) -> str:
        return f"http://{self.server_address[0]}:{self.port}"


@contextmanager
def serving(host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Iterator[_Server]:
    server = _Server(host)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def remote(**kw: Any) -> ImagePolicy:
    return ImagePolicy(allow_remote=True, fetch_timeout_s=5, **kw)


@pytest.fixture
def no_connections(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Fail any outgoing TCP connection attempt; the list holds what was attempted."""
    attempts: list[Any] = []

    def refuse(*args: Any, **kw: Any) -> None:
        attempts.append(args)
        raise AssertionError(f"connection attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """``getaddrinfo`` for names ending in ``.test``: each name's answers (one per call, the last one
    repeating) from ``answers[name]``; every call recorded in ``calls``. Other names resolve for real."""
    real = socket.getaddrinfo
    state: dict[str, Any] = {"answers": {}, "calls": [], "delay": {}}

    def fake(host: Any, port: Any, *args: Any, **kw: Any) -> list[tuple]:
        if not str(host).endswith(".test"):
            return real(host, port, *args, **kw)
        state["calls"].append(host)
        time.sleep(state["delay"].get(host, 0))
        seq = state["answers"][host]
        n = sum(1 for h in state["calls"] if h == host)
        ip = seq[min(n, len(seq)) - 1]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, int(port)))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return state


# -- item 6: where a fetch may go -----------------------------------------------------------------
def test_loopback_refused_by_default_and_fetched_when_allow_listed() -> None:
    with serving() as srv:
        e = rejects("image_url_not_allowed", load_image, f"{srv.base}/img.png", remote())
        assert "loopback" in e.message
        assert srv.hits == []  # refused before connecting
        assert load_image(f"{srv.base}/img.png", remote(allowed_remote_networks=LOOPBACK)).size == (32, 16)
        # Another allow-listed network does not open loopback.
        rejects("image_url_not_allowed", load_image, f"{srv.base}/img.png",
                remote(allowed_remote_networks=["10.0.0.0/8"]))
        assert srv.hits == ["/img.png"]


def test_allowed_networks_are_validated() -> None:
    assert ImagePolicy(allowed_remote_networks=[" 10.1.0.0/16", "fd00::/8"]).allowed_remote_networks == [
        "10.1.0.0/16", "fd00::/8"]
    for bad in ("not a network", "10.1.2.3/8", "300.0.0.0/8"):
        with pytest.raises(ValueError):
            ImagePolicy(allowed_remote_networks=[bad])


def test_a_name_resolving_to_loopback_is_refused() -> None:
    with serving() as srv:
        rejects("image_url_not_allowed", load_image, f"http://localhost:{srv.port}/img.png", remote())
        assert srv.hits == []


@pytest.mark.parametrize("url", [
    "http://10.0.0.1/a.png",
    "http://192.168.1.1/a.png",
    "http://172.16.0.1/a.png",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://100.64.0.1/a.png",  # carrier-grade NAT
    "http://0.0.0.0/a.png",
    "http://224.0.0.1/a.png",
    "http://127.1/a.png",
    "http://2130706433/a.png",  # 127.0.0.1 as one decimal number
    "https://[::1]/a.png",
    "http://[::ffff:127.0.0.1]/a.png",
    "http://[::ffff:169.254.169.254]/a.png",
    "http://[2002:7f00:1::1]/a.png",  # 6to4 around 127.0.0.1
    "http://[64:ff9b::a00:1]/a.png",  # NAT64 around 10.0.0.1
    "http://[fe80::1]/a.png",
    "http://[fc00::1]/a.png",
    "http://[::]/a.png",
])
def test_internal_addresses_refused_without_a_connection(url: str, no_connections: list[Any]) -> None:
    rejects("image_url_not_allowed", load_image, url, remote())
    assert no_connections == []


def test_mapped_ipv6_follows_the_ipv4_allow_list() -> None:
    networks = remote(allowed_remote_networks=LOOPBACK).remote_networks()
    assert images_mod._allow_listed(ipaddress.ip_address("::ffff:127.0.0.1"), networks)
    assert not images_mod._allow_listed(ipaddress.ip_address("::ffff:10.0.0.1"), networks)
    assert not images_mod._allow_listed(ipaddress.ip_address("2002:7f00:1::1"), networks)  # 6to4 is another route


def test_environment_proxies_are_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    with serving() as srv:
        for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
            monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens there
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        assert load_image(f"{srv.base}/img.png", remote(allowed_remote_networks=LOOPBACK)).size == (32, 16)
        assert srv.hits == ["/img.png"]


# -- item 6: redirects ---------------------------------------------------------------------------
def test_redirect_to_an_address_not_allow_listed_is_refused() -> None:
    with serving("127.0.0.1") as a, serving("127.0.0.2") as b:
        hop = f"{a.base}/to?url=" + urllib.parse.quote(f"{b.base}/img.png")
        e = rejects("image_url_not_allowed", load_image, hop, remote(allowed_remote_networks=["127.0.0.1/32"]))
        assert "loopback" in e.message
        assert len(a.hits) == 1 and b.hits == []
        # With 127.0.0.2 allowed too, the same redirect is followed.
        assert load_image(hop, remote(allowed_remote_networks=LOOPBACK)).size == (32, 16)
        assert b.hits == ["/img.png"]


def test_redirect_count_is_bounded() -> None:
    with serving() as srv:
        policy = remote(allowed_remote_networks=LOOPBACK, max_redirects=3)
        assert load_image(f"{srv.base}/chain/3", policy).size == (32, 16)  # exactly 3 redirects
        srv.hits.clear()
        e = rejects("image_fetch_failed", load_image, f"{srv.base}/loop", policy)
        assert "redirects" in e.message
        assert len(srv.hits) == 4  # the request and 3 redirects, no more
        rejects("image_fetch_failed", load_image, f"{srv.base}/chain/1",
                remote(allowed_remote_networks=LOOPBACK, max_redirects=0))


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "gopher://127.0.0.1:70/x",
                                    "data:image/png;base64,AAAA"])
def test_redirect_to_another_scheme_is_refused(target: str) -> None:
    with serving() as srv:
        rejects("image_url_not_allowed", load_image, f"{srv.base}/to?url=" + urllib.parse.quote(target),
                remote(allowed_remote_networks=LOOPBACK))


# -- item 6: one lookup per host, pinned --------------------------------------------------------------
def test_each_host_is_resolved_once_and_the_connection_uses_that_answer(fake_dns: dict[str, Any]) -> None:
    with serving("127.0.0.1") as a, serving("127.0.0.2") as b:
        # A rebinding name: first answer allow-listed, any later answer internal (b must never be hit).
        fake_dns["answers"]["images.test"] = ["127.0.0.1", "127.0.0.2"]
        policy = remote(allowed_remote_networks=["127.0.0.1/32"])
        assert load_image(f"http://images.test:{a.port}/img.png", policy).size == (32, 16)
        assert fake_dns["calls"] == ["images.test"]
        assert a.hosts == [f"images.test:{a.port}"]  # the name travels in Host:, the IP was connected to
        assert b.hits == []


def test_a_redirect_target_is_resolved_again_and_checked_again(fake_dns: dict[str, Any]) -> None:
    with serving("127.0.0.1") as a, serving("127.0.0.2") as b:
        fake_dns["answers"]["images.test"] = ["127.0.0.1", "127.0.0.2"]
        # Same port on both addresses is not needed: the second answer is refused before connecting.
        hop = f"http://images.test:{a.port}/to?url=" + urllib.parse.quote(f"http://images.test:{a.port}/img.png")
        e = rejects("image_url_not_allowed", load_image, hop, remote(allowed_remote_networks=["127.0.0.1/32"]))
        assert "127.0.0.2" not in e.message  # the reason, not the internal address it resolved to
        assert fake_dns["calls"] == ["images.test", "images.test"]
        assert a.hits == ["/to?url=" + urllib.parse.quote(f"http://images.test:{a.port}/img.png")]
        assert b.hits == []


def test_a_name_with_any_internal_address_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                      no_connections: list[Any]) -> None:
    def two(host: Any, port: Any, *args: Any, **kw: Any) -> list[tuple]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", int(port))),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", int(port)))]

    monkeypatch.setattr(socket, "getaddrinfo", two)
    rejects("image_url_not_allowed", load_image, "http://mixed.test/a.png",
            remote(allowed_remote_networks=["127.0.0.1/32"]))
    assert no_connections == []


# -- item 6: TLS to the pinned address, checked against the name -----------------------------------
@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for DNS name ``images.test`` only (no IP address in it).

    ``cryptography`` comes with mlx-vlm, a dependency of ours: never skipped."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "images.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("images.test")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    d = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return d / "cert.pem", d / "key.pem"


def test_https_connects_to_the_pinned_address_and_verifies_the_name(
        tls_files: tuple[Path, Path], fake_dns: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = tls_files
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    sni: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: sni.append(name)
    fake_dns["answers"]["images.test"] = ["127.0.0.1"]
    policy = remote(allowed_remote_networks=LOOPBACK)
    with serving(tls=server_ctx) as srv:
        url = f"https://images.test:{srv.port}/img.png"
        # The system trust store does not know this certificate: refused as a fetch failure.
        rejects("image_fetch_failed", load_image, url, policy)
        trusting = ssl.create_default_context(cafile=str(cert))
        monkeypatch.setattr(images_mod, "_tls_context", lambda: trusting)
        assert load_image(url, policy).size == (32, 16)
        assert sni[-1] == "images.test" and srv.hosts[-1] == f"images.test:{srv.port}"
        # The same server by IP: the certificate does not name 127.0.0.1, so verification fails.
        e = rejects("image_fetch_failed", load_image, f"https://127.0.0.1:{srv.port}/img.png", policy)
        assert "certificate" in e.message


# -- item 6: one deadline per image, bounded bytes -------------------------------------------------
@pytest.mark.parametrize("path", ["/drip-body", "/drip-head"])
def test_a_slow_drip_server_is_cut_off_at_the_deadline(path: str) -> None:
    with serving() as srv:
        policy = ImagePolicy(allow_remote=True, fetch_timeout_s=1, allowed_remote_networks=LOOPBACK)
        start = time.monotonic()
        e = rejects("image_fetch_failed", load_image, f"{srv.base}{path}", policy)
        elapsed = time.monotonic() - start
        assert elapsed < 2 * policy.fetch_timeout_s, elapsed
        assert "longer than 1 s" in e.message


def test_a_slow_tls_handshake_is_cut_off_at_the_deadline() -> None:
    """A TLS record header announcing 16 KiB, then one byte every 0.2 s: the handshake never ends."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        with conn:
            try:
                conn.sendall(b"\x16\x03\x03\x40\x00")
                while not stop.wait(0.2):
                    conn.sendall(b"\x00")
            except OSError:
                pass

    threading.Thread(target=drip, daemon=True).start()
    policy = ImagePolicy(allow_remote=True, fetch_timeout_s=1, allowed_remote_networks=LOOPBACK)
    start = time.monotonic()
    try:
        rejects("image_fetch_failed", load_image, f"https://127.0.0.1:{listener.getsockname()[1]}/a.png", policy)
        assert time.monotonic() - start < 2 * policy.fetch_timeout_s
    finally:
        stop.set()
        listener.close()


def test_the_deadline_covers_every_redirect() -> None:
    with serving() as srv:
        # Each hop answers in 0.4 s, well within 1 s; together they are not.
        policy = ImagePolicy(allow_remote=True, fetch_timeout_s=1, max_redirects=20, allowed_remote_networks=LOOPBACK)
        start = time.monotonic()
        rejects("image_fetch_failed", load_image, f"{srv.base}/slow-redirect", policy)
        assert time.monotonic() - start < 2 * policy.fetch_timeout_s
        assert 2 <= len(srv.hits) <= 4


def test_the_deadline_covers_the_name_lookup(fake_dns: dict[str, Any]) -> None:
    fake_dns["answers"]["slow.test"] = ["127.0.0.1"]
    fake_dns["delay"]["slow.test"] = 3.0
    policy = ImagePolicy(allow_remote=True, fetch_timeout_s=0.5, allowed_remote_networks=LOOPBACK)
    start = time.monotonic()
    rejects("image_fetch_failed", load_image, "http://slow.test:9/a.png", policy)
    assert time.monotonic() - start < 2 * policy.fetch_timeout_s


def test_downloads_are_bounded_in_bytes() -> None:
    with serving() as srv:
        policy = remote(allowed_remote_networks=LOOPBACK, max_bytes=10_000)
        e = rejects("image_too_large", load_image, f"{srv.base}/big", policy)
        assert "20,000" in e.message  # refused on Content-Length, before reading
        e = rejects("image_too_large", load_image, f"{srv.base}/big-unsized", policy)
        assert "10,001" in e.message  # read stopped one byte past the limit
        rejects("image_fetch_failed", load_image, f"{srv.base}/missing.png", policy)  # HTTP 404


# -- item 3: pixel budget per request, before decoding ---------------------------------------------
@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record (and fail) any pixel decode."""
    calls: list[Any] = []

    def load(self: Any) -> None:
        calls.append(self)
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(Image.Image, "load", load)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


# Built before any test patches decoding away (saving a PNG loads its pixels).
IMG_64 = data_uri(png_bytes((64, 64), 1))
IMG_640 = data_uri(png_bytes((640, 480), 1))
IMG_THIN = data_uri(png_bytes((402, 2), 1))  # aspect ratio over 200


def test_request_pixel_budget_is_checked_from_headers(no_decoding: list[Any]) -> None:
    policy = ImagePolicy(max_pixels=64 * 64, max_total_pixels=64 * 64 + 100)
    opened = open_request_images([IMG_64], policy)  # one image: within both limits
    assert [im.size for im in opened] == [(64, 64)]
    e = rejects("image_too_large", open_request_images, [IMG_64, IMG_64], policy)
    assert "4,196" in e.message
    assert no_decoding == []


def test_remote_images_past_the_budget_stop_the_request_early() -> None:
    with serving() as srv:
        policy = remote(allowed_remote_networks=LOOPBACK, max_total_pixels=32 * 16 + 1)
        url = f"{srv.base}/img.png"
        rejects("image_too_large", open_request_images, [url, url, url], policy)
        assert len(srv.hits) == 2  # the third image was never fetched


# -- item 3: image tokens estimated from headers, checked against the context --------------------
@pytest.fixture(scope="module")
def vlm(vision_model_dir: Path) -> Any:
    from engine.vision import load_vision_model

    m = load_vision_model("demo-vision", str(vision_model_dir), {
        "max_batch_size": 2, "prefill_batch_size": 1, "prefill_step_size": 512})
    yield m
    m.batch.close()


def prepare(vlm: Any, messages: list[ChatMessage], policy: ImagePolicy | None = None, **kw: Any) -> Any:
    from engine.vision import prepare_vision_inputs

    return prepare_vision_inputs(vlm.processor, vlm.model.config, messages, policy or ImagePolicy(), **kw)


SIZES = [(64, 64), (96, 64), (17, 33), (300, 200), (1000, 20), (640, 480), (224, 224), (2, 300), (57, 1)]


def test_image_token_estimate_equals_what_the_processor_produces(vlm: Any) -> None:
    from engine.vision import _smart_resize_tokens, estimate_image_tokens, estimate_prompt_tokens

    processor, cfg = vlm.processor, vlm.model.config
    seen = set()
    for w, h in SIZES:
        vi = prepare(vlm, [user("Describe this.", data_uri(png_bytes((w, h), 2)))])
        actual = vi.input_ids.count(cfg.image_token_id)
        assert estimate_image_tokens(processor, cfg, w, h) == actual, (w, h)
        assert _smart_resize_tokens(processor.image_processor, w, h) == actual, (w, h)  # our port, too
        assert estimate_prompt_tokens(processor, cfg, vi.prompt, [(w, h)]) == len(vi.input_ids), (w, h)
        seen.add(actual)
    assert len(seen) >= 4  # the sizes exercise different resize branches
    # Several images across turns.
    msgs = [user("first", data_uri(png_bytes((300, 200), 1))), ChatMessage(role="assistant", content="ok"),
            user("second", data_uri(png_bytes((17, 33), 2)), data_uri(png_bytes((1000, 20), 3)))]
    vi = prepare(vlm, msgs)
    assert estimate_prompt_tokens(processor, cfg, vi.prompt, [(300, 200), (17, 33), (1000, 20)]) == len(vi.input_ids)


def test_a_prompt_over_the_context_is_refused_before_decoding(vlm: Any, no_decoding: list[Any]) -> None:
    from engine.vision import check_vision_context, estimate_prompt_tokens, render_vision_prompt

    processor, cfg, context = vlm.processor, vlm.model.config, vlm.context_length
    big = IMG_640
    prompt, _ = render_vision_prompt(processor, cfg, [user("Describe this.", big)], ImagePolicy())
    need_big = estimate_prompt_tokens(processor, cfg, prompt, [(640, 480)])
    need_small = estimate_prompt_tokens(processor, cfg, prompt, [(64, 64)])
    assert need_big is not None and need_small is not None and need_big > need_small
    max_tokens = context - need_small  # fits with the small image, not with the big one
    e = rejects("context_length_exceeded", prepare, vlm, [user("Describe this.", big)],
                context_length=context, max_tokens=max_tokens)
    assert str(context) in e.message and str(need_big) in e.message
    assert no_decoding == []
    assert check_vision_context(processor, cfg, prompt, [(64, 64)], context, max_tokens) == need_small
    with pytest.raises(InvalidRequestError):
        check_vision_context(processor, cfg, prompt, [(64, 64)], context, max_tokens + 1)


def test_the_context_check_admits_what_fits(vlm: Any) -> None:
    msgs = [user("Describe this.", data_uri(png_bytes((640, 480), 1)))]
    n = len(prepare(vlm, msgs).input_ids)
    assert len(prepare(vlm, msgs, context_length=n + 10, max_tokens=10).input_ids) == n


def test_extreme_aspect_ratio_is_refused_before_decoding(vlm: Any, no_decoding: list[Any]) -> None:
    rejects("invalid_image", prepare, vlm, [user("x", IMG_THIN)],
            context_length=vlm.context_length)
    assert no_decoding == []


def test_pixel_budget_applies_to_chat_requests_before_decoding(vlm: Any, no_decoding: list[Any]) -> None:
    policy = ImagePolicy(max_total_pixels=64 * 64 * 2 - 1)
    rejects("image_too_large", prepare, vlm, [user("x", IMG_64, IMG_64)], policy)
    assert no_decoding == []


def test_families_without_an_estimate_fall_back_to_the_pixel_budget(vlm: Any) -> None:
    from types import SimpleNamespace

    from engine.vision import check_vision_context, estimate_image_tokens

    other = SimpleNamespace(model_type="llava")
    assert estimate_image_tokens(vlm.processor, other, 640, 480) is None
    assert check_vision_context(vlm.processor, other, "x", [(640, 480)], context_length=1, max_tokens=1) is None


def test_image_placeholder_text_in_a_message_is_refused(vlm: Any, no_decoding: list[Any]) -> None:
    rejects("invalid_image", prepare, vlm, [user("look: <|image_pad|>", IMG_64)], context_length=vlm.context_length)
    assert no_decoding == []
