"""What listens where, what guards it, and the CLI refusing to open the API to the network (no Ray).

The listing is checked against a real process of this test that listens on 127.0.0.1 and on
0.0.0.0 (nothing connects to it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster import exposure, serve_config
from cluster.cli import main
from cluster.exposure import AppAuth, Listener
from deployments.http.auth import hash_key, new_key

MLX_SERVING = Path(sys.executable).with_name("mlx-serving")


def config(host: str | None = None, auth: dict | None = None) -> dict:
    args: dict = {"models": [{"name": "demo", "source": "demo:tiny"}]}
    if auth is not None:
        args["auth"] = auth
    out: dict = {"applications": [{"name": "mlx-serving", "route_prefix": "/",
                                   "import_path": serve_config.BUILD_APP, "args": args}]}
    if host is not None:
        out["http_options"] = {"host": host, "port": 8123}
    return out


@pytest.fixture()
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLX_SERVING_CACHE", str(tmp_path / "cache"))
    for k in ("MLX_SERVING_API_KEYS", "MLX_SERVING_ADMIN_KEYS"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path / "cache"


# --- classification -----------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "::ffff:127.0.0.1", "localhost"])
def test_loopback_addresses(host: str) -> None:
    assert exposure.is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.0.2.2", "10.0.0.10", "::ffff:192.0.2.2", "fe80::1",
                                  "no-such-host.invalid"])
def test_network_reachable_addresses(host: str) -> None:
    assert not exposure.is_loopback(host)  # a wildcard, a LAN address, or a name we cannot vouch for


def test_ipv4_on_an_ipv6_socket_is_shown_as_ipv4() -> None:
    assert exposure.unmapped("::ffff:192.0.2.2") == "192.0.2.2"
    assert exposure.unmapped("::") == "::" and exposure.unmapped("localhost") == "localhost"
    assert str(Listener(1, "p", "::", 6379)) == "[::]:6379" and str(Listener(1, "p", "0.0.0.0", 80)) == "0.0.0.0:80"


def test_ray_processes_are_named_by_their_role() -> None:
    py = "/venv/bin/python3"
    site = "/venv/lib/python3.11/site-packages/ray"
    assert exposure.process_label("gcs_server", [f"{site}/core/src/ray/gcs/gcs_server"]) == "Ray GCS (gcs_server)"
    assert exposure.process_label("python3", [py, "-m", "ray.util.client.server", "--address=x"]) == \
        "Ray client server (ray.util.client.server)"
    assert exposure.process_label("python3", [py, "-u", f"{site}/dashboard/dashboard.py", "--host=127.0.0.1"]) == \
        "Ray dashboard (dashboard.py)"
    assert exposure.process_label("ray::ProxyActor", ["ray::ProxyActor"]) == "Serve HTTP proxy (ray::ProxyActor)"
    assert exposure.process_label("ray::ServeReplica:a:ingress", []) == "ray::ServeReplica:a:ingress"
    assert exposure.process_label("python3", [py, "/home/me/server.py"]) == "server.py"
    assert exposure.looks_like_ray("raylet", []) and exposure.looks_like_ray("python3", [py, f"{site}/dashboard/agent.py"])
    assert exposure.looks_like_ray("python3", [py, "-m", "ray.util.client.server"])
    assert not exposure.looks_like_ray("python3", [py, "-m", "http.server"])
    assert not exposure.looks_like_ray("python3", [py, "/home/me/array/main.py"])


def test_report_says_auth_keys_and_what_listens_beyond_loopback() -> None:
    found = [Listener(10, "Ray GCS (gcs_server)", "::", 6379), Listener(11, "Ray dashboard (dashboard.py)", "127.0.0.1", 8265),
             Listener(12, "Ray client server (ray.util.client.server)", "192.0.2.2", 23456),
             Listener(12, "Ray client server (ray.util.client.server)", "127.0.0.1", 23456)]
    text = "\n".join(exposure.report(ray_auth="token", apps=[AppAuth("mlx-serving", 2, 1, False)],
                                     http_host="127.0.0.1", http_port=8000, found=found))
    assert "Ray token auth: on" in text and "metrics endpoints stay open" in text
    assert "API of mlx-serving: a key is required (2 API key(s), 1 admin key(s) configured)" in text
    assert "Serve HTTP: 127.0.0.1:8000 (loopback only)" in text
    beyond, loopback = text.split("listening beyond loopback")[1].split("loopback only:")
    assert "Ray GCS (gcs_server) (pid 10): [::]:6379" in beyond
    assert "Ray client server (ray.util.client.server) (pid 12): 192.0.2.2:23456" in beyond
    assert "8265" not in beyond and "Ray dashboard (dashboard.py) (pid 11): 127.0.0.1:8265" in loopback
    assert "127.0.0.1:23456" in loopback
    short = "\n".join(exposure.report(ray_auth="token", apps=[], http_host="127.0.0.1", http_port=8000, found=found,
                                      detail=False))
    assert "loopback only: 2 more socket(s) of 2 process(es)" in short and "8265" not in short
    assert "192.0.2.2:23456" in short

    text = "\n".join(exposure.report(ray_auth="disabled", apps=[AppAuth("a", 0, 0, True)], http_host="0.0.0.0",
                                     http_port=8000, found=[Listener(1, "x", "127.0.0.1", 1)]))
    assert "Ray token auth: OFF" in text and "run code on it" in text
    assert "API of a: NO key required: anyone who reaches 0.0.0.0:8000 can use the models (allow_unauthenticated_network)" in text
    assert "Serve HTTP: 0.0.0.0:8000 (reachable from the network)" in text and "nothing listens beyond loopback" in text
    text = "\n".join(exposure.report(ray_auth=None, apps=[AppAuth("a", 0, 0, False)], http_host="127.0.0.1",
                                     http_port=8000, found=[]))
    assert "no key required; HTTP listens on loopback only" in text and "no listening socket" in text


# --- the real listing -------------------------------------------------------------------------------

LISTEN = """
import socket, sys, time
socks = []
for host in ("127.0.0.1", "0.0.0.0"):
    s = socket.socket(); s.bind((host, 0)); s.listen(); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks), flush=True)
time.sleep(120)
"""


def test_listing_finds_a_real_process_sockets_and_separates_loopback() -> None:
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {LISTEN!r}])"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        local_port, any_port = map(int, parent.stdout.readline().split())
        pids = exposure.tree_pids([parent.pid])
        assert pids[0] == parent.pid and len(pids) == 2  # the listening child is found through its parent
        found = exposure.listeners(pids)
        assert {(x.host, x.port, x.pid) for x in found} == {("127.0.0.1", local_port, pids[1]), ("0.0.0.0", any_port, pids[1])}
        beyond, loopback = exposure.split(found)
        assert [(x.host, x.port) for x in beyond] == [("0.0.0.0", any_port)]
        assert [(x.host, x.port) for x in loopback] == [("127.0.0.1", local_port)]
        assert found[0].process == "python3" or found[0].process.startswith("python")
        assert pids[1] not in exposure.user_ray_pids()  # not a Ray process
    finally:
        for p in exposure.tree_pids([parent.pid])[::-1]:
            os.kill(p, 9)
        parent.wait()


# --- API keys and the HTTP bind -----------------------------------------------------------------------

def test_non_loopback_bind_needs_a_key_or_an_explicit_opt_in() -> None:
    assert exposure.http_bind_problem(config("127.0.0.1"), allowed_by_flag=False, environ={}) is None
    assert exposure.http_bind_problem(config(), allowed_by_flag=False, environ={}) is None  # Serve's default: loopback
    problem = exposure.http_bind_problem(config("0.0.0.0"), allowed_by_flag=False, environ={})
    assert problem is not None and "0.0.0.0:8123" in problem
    assert "--allow-unauthenticated-network" in problem and "args.auth.allow_unauthenticated_network: true" in problem
    assert "MLX_SERVING_API_KEYS" in problem and "mlx-serving keys new" in problem
    assert exposure.http_bind_problem(config("0.0.0.0"), allowed_by_flag=True, environ={}) is None
    assert exposure.http_bind_problem(config("0.0.0.0"), allowed_by_flag=False, environ={"MLX_SERVING_API_KEYS": "k"}) is None
    # validate does not know the keys of a later `up`: it still says so, naming the variable
    later = exposure.http_bind_problem(config("0.0.0.0"), allowed_by_flag=False, at_up=False,
                                       environ={"MLX_SERVING_API_KEYS": "k"})
    assert later is not None and later.startswith("http_options.host: ") and "MLX_SERVING_API_KEYS" in later
    hashed = config("10.0.0.10", auth={"api_keys": [hash_key("k")]})
    assert exposure.http_bind_problem(hashed, allowed_by_flag=False, environ={}) is None
    opted = config("0.0.0.0", auth={"allow_unauthenticated_network": True})
    assert exposure.http_bind_problem(opted, allowed_by_flag=False, environ={}) is None
    # keys with a policy (name, limits) open the API as well: they count as keys
    policy = config("0.0.0.0", auth={"keys": [{"key": hash_key("k"), "name": "team-a"}]})
    assert exposure.http_bind_problem(policy, allowed_by_flag=False, environ={}) is None
    deployed = serve_config.for_deploy(policy, {})
    assert exposure.app_auth(deployed["applications"][0]) == AppAuth("mlx-serving", 1, 0, False)


def test_the_flag_sets_the_config_field_the_ingress_receives() -> None:
    cfg = config("0.0.0.0")
    exposure.allow_unauthenticated_network(cfg)
    assert cfg["applications"][0]["args"]["auth"] == {"allow_unauthenticated_network": True}
    assert serve_config.problems(cfg) == []
    deployed = serve_config.for_deploy(cfg, {})
    assert exposure.app_auth(deployed["applications"][0]) == AppAuth("mlx-serving", 0, 0, True)


def test_keys_are_counted_and_deployed_as_hashes_only() -> None:
    key, admin = new_key(), new_key()
    cfg = config("0.0.0.0", auth={"api_keys": [hash_key("other")]})
    deployed = serve_config.for_deploy(cfg, {"MLX_SERVING_API_KEYS": key, "MLX_SERVING_ADMIN_KEYS": admin})
    assert exposure.app_auth(deployed["applications"][0]) == AppAuth("mlx-serving", 2, 1, False)
    text = yaml.safe_dump(deployed)
    assert hash_key(key) in text and hash_key(admin) in text and key not in text and admin not in text


# --- the CLI ------------------------------------------------------------------------------------------

def test_keys_new_and_hash(isolated_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new"]) == 0
    out = capsys.readouterr().out
    key = out.split("key:")[1].split()[0]
    assert len(key) > 40 and f"hash: {hash_key(key)}" in out
    assert "auth.api_keys" in out and "MLX_SERVING_API_KEYS" in out
    assert main(["keys", "hash", "sk-abc"]) == 0 and capsys.readouterr().out.strip() == hash_key("sk-abc")
    res = subprocess.run([str(MLX_SERVING), "keys", "hash", "-"], input="sk-from-stdin\n", capture_output=True,
                         text=True, timeout=60, env={**os.environ, "MLX_SERVING_CACHE": str(isolated_cache)})
    assert res.returncode == 0 and res.stdout.strip() == hash_key("sk-from-stdin"), res.stderr
    assert "sk-from-stdin" not in res.stdout
    res = subprocess.run([str(MLX_SERVING), "keys", "hash", "-"], input="", capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MLX_SERVING_CACHE": str(isolated_cache)})
    assert res.returncode == 1 and "no key given" in res.stderr


def test_validate_warns_about_an_open_port_without_failing(tmp_path: Path, isolated_cache: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    open_cfg, closed = tmp_path / "open.yaml", tmp_path / "closed.yaml"
    open_cfg.write_text(yaml.safe_dump(config("0.0.0.0")))
    closed.write_text(yaml.safe_dump(config("0.0.0.0", auth={"api_keys": [hash_key("k")]})))
    assert main(["validate", str(open_cfg), str(closed)]) == 0
    out = capsys.readouterr().out
    assert f"{open_cfg}: ok (1 warning(s))" in out and f"{closed}: ok\n" in out
    assert "warning: http_options.host: HTTP on 0.0.0.0:8123 is reachable from the network" in out
    assert "MLX_SERVING_API_KEYS when running `mlx-serving up`" in out
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(config("127.0.0.1", auth={"api_keys": ["sk-plain-secret"]})))
    assert main(["validate", str(plain)]) == 1
    out = capsys.readouterr().out
    assert "give key hashes" in out and "sk-plain-secret" not in out


def test_emit_config_never_holds_a_plain_key(tmp_path: Path, isolated_cache: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    inv = {"head": "a", "hosts": [{"name": "a", "address": "127.0.0.1", "chip": "simulated", "memory_gb": 8}],
           "models": [{"name": "m", "source": "org/m", "footprint_gb": 1}], "app": {"auth": {"api_keys": ["sk-plain-secret"]}}}
    monkeypatch.setenv("MLX_SERVING_API_KEYS", "sk-env-secret")
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(inv))
    assert main(["plan", str(path), "--emit-config", "-"]) == 1
    captured = capsys.readouterr()
    assert "give key hashes" in captured.err and "sk-plain-secret" not in captured.out + captured.err
    inv["app"]["auth"]["api_keys"] = [hash_key("sk-plain-secret")]
    path.write_text(yaml.safe_dump(inv))
    assert main(["plan", str(path), "--emit-config", "-"]) == 0
    out = capsys.readouterr().out
    assert hash_key("sk-plain-secret") in out and "sk-plain-secret" not in out and "sk-env-secret" not in out
