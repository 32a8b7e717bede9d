"""``models pull`` / ``models list``: a hub model downloaded once, copied to each host's own Hugging
Face cache over Ray, checked against the hub's hashes, resumed after an interruption, and loadable
there offline. The hub is local (its cache layout in a temp dir, see fake_hub); the three hosts are
Ray nodes of the session cluster, each with its own cache directory."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cluster.model_copy import CacheWriter, CopyError, read_snapshot, send
from fake_hub import blob_name, publish

COMMIT = "c" * 40
REPO = "acme/chat"


def local_call(writer: CacheWriter) -> Any:
    return lambda name, *args: functools.partial(lambda r: r, getattr(writer, name)(*args))


def weights_blob(hub: Path, model_dir: Path) -> str:
    return blob_name(model_dir / "model.safetensors")


def assert_same_snapshot(cache: Path, model_dir: Path) -> Path:
    """The host's cache holds the model at COMMIT, loadable offline, byte for byte."""
    from huggingface_hub import snapshot_download

    snap = Path(snapshot_download(REPO, cache_dir=cache, local_files_only=True))
    assert snap == cache / "models--acme--chat" / "snapshots" / COMMIT
    for src in (p for p in model_dir.rglob("*") if p.is_file()):
        copy = snap / src.relative_to(model_dir)
        assert copy.is_symlink() and copy.read_bytes() == src.read_bytes(), copy
    assert not list((cache / "models--acme--chat" / "blobs").glob("*.incomplete"))
    return snap


def test_a_copy_is_checked_resumed_and_loadable(tmp_path: Path, tiny_model_dir: Path) -> None:
    hub, dest = tmp_path / "hub", tmp_path / "dest"
    snap = read_snapshot(publish(hub, REPO, tiny_model_dir, COMMIT), REPO)
    assert snap.refs == {"main": COMMIT} and snap.total_bytes == sum(f.stat().st_size for f in tiny_model_dir.iterdir())
    blob = weights_blob(hub, tiny_model_dir)
    partial = dest / snap.folder / "blobs" / (blob + ".incomplete")

    # An interrupted copy left 300,000 bytes: the copy resumes there and sends only the rest.
    partial.parent.mkdir(parents=True)
    partial.write_bytes((tiny_model_dir / "model.safetensors").read_bytes()[:300_000])
    sent: list[int] = []
    resumed: list[tuple[str, int]] = []
    writer = CacheWriter(str(dest))
    where = send(local_call(writer), snap, hub / snap.folder / "snapshots" / COMMIT, chunk_bytes=64 * 1024,
                 advance=sent.append, resumed=lambda p, n: resumed.append((p, n)))
    assert resumed == [("model.safetensors", 300_000)]
    assert sent[0] == 300_000 and sum(sent) == snap.total_bytes
    assert where == str(assert_same_snapshot(dest, tiny_model_dir))

    # Again: everything is there, nothing is sent.
    sent.clear()
    send(local_call(writer), snap, hub / snap.folder / "snapshots" / COMMIT, advance=sent.append)
    assert sent == [snap.total_bytes]


def test_a_corrupt_partial_copy_fails_its_hash_and_is_removed(tmp_path: Path, tiny_model_dir: Path) -> None:
    hub, dest = tmp_path / "hub", tmp_path / "dest"
    snap = read_snapshot(publish(hub, REPO, tiny_model_dir, COMMIT), REPO)
    partial = dest / snap.folder / "blobs" / (weights_blob(hub, tiny_model_dir) + ".incomplete")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 4096)  # right length to resume from, wrong content
    source = hub / snap.folder / "snapshots" / COMMIT
    with pytest.raises(CopyError, match="model.safetensors: received hash"):
        send(local_call(CacheWriter(str(dest))), snap, source)
    assert not partial.exists()
    send(local_call(CacheWriter(str(dest))), snap, source)  # the next pull starts that file afresh
    assert_same_snapshot(dest, tiny_model_dir)


def test_a_chunk_out_of_order_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    hub = tmp_path / "hub"
    snap = read_snapshot(publish(hub, REPO, tiny_model_dir, COMMIT), REPO)
    with pytest.raises(CopyError, match="chunk at byte 10, but 0 bytes are here"):
        CacheWriter(str(tmp_path / "dest")).write(snap, weights_blob(hub, tiny_model_dir), 10, b"x")


# -- over Ray, three simulated hosts --------------------------------------------------------------

HOSTS = ("pull-a", "pull-b", "pull-c")


@pytest.fixture(scope="module")
def pull_hosts(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Three Ray nodes, each with its own Hugging Face cache, as three Macs have."""
    root = tmp_path_factory.mktemp("host-caches")
    caches = {h: root / h for h in HOSTS}
    added = [ray_cluster.add_node(num_cpus=1, labels={"host": h}, resources={f"host:{h}": 1000},
                                  node_ip_address="127.0.0.1", env_vars={"HF_HUB_CACHE": str(caches[h])})
             for h in HOSTS]
    ray_cluster.wait_for_nodes()
    yield caches
    for node in added:
        ray_cluster.remove_node(node)


def cli(ray_cluster: Any, hub: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ray_cluster.address}
    return subprocess.run([sys.executable, "-m", "cluster.cli", "models", *args, "--address", ray_cluster.address],
                          capture_output=True, text=True, env=env, timeout=240)


def test_pull_copies_to_three_hosts_and_list_shows_them(ray_cluster: Any, pull_hosts: dict[str, Path],
                                                         tiny_model_dir: Path, tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    publish(hub, REPO, tiny_model_dir, COMMIT)
    # pull-b was interrupted during an earlier pull: part of the weights is there already.
    partial = pull_hosts["pull-b"] / "models--acme--chat" / "blobs" / (weights_blob(hub, tiny_model_dir) + ".incomplete")
    partial.parent.mkdir(parents=True)
    partial.write_bytes((tiny_model_dir / "model.safetensors").read_bytes()[:2 * 2**20 // 8])

    done = cli(ray_cluster, hub, "pull", REPO, "--hosts", ",".join(HOSTS), "--chunk-bytes", str(100_000))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = {line.split(":")[0].strip(): line for line in done.stdout.splitlines() if line.startswith("  pull-")}
    assert set(lines) == set(HOSTS)
    assert "resumed model.safetensors at 0.2 MiB" in lines["pull-b"]
    assert all("resumed" not in lines[h] for h in ("pull-a", "pull-c"))
    for host, cache in pull_hosts.items():
        snap = assert_same_snapshot(cache, tiny_model_dir)
        assert str(snap) in lines[host]

    listed = cli(ray_cluster, hub, "list")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith(REPO))
    assert f"{COMMIT[:12]} (main)" in row and all(h in row for h in HOSTS) and "incomplete" not in row


def test_pull_names_a_host_that_is_not_in_the_cluster(ray_cluster: Any, pull_hosts: dict[str, Path],
                                                      tiny_model_dir: Path, tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    publish(hub, REPO, tiny_model_dir, COMMIT)
    done = cli(ray_cluster, hub, "pull", REPO, "--hosts", "pull-a,nowhere")
    assert done.returncode == 1 and "not in the cluster: nowhere" in done.stderr


def test_an_inventory_names_the_hosts_that_run_the_model_and_their_failover(tmp_path: Path) -> None:
    from cluster.models_cli import hosts_for

    inventory = tmp_path / "fleet.yaml"
    inventory.write_text("""
head: a
hosts:
  - {name: a, address: 127.0.0.1, chip: M4, memory_gb: 16}
  - {name: b, address: 127.0.0.1, chip: M4, memory_gb: 16}
  - {name: c, address: 127.0.0.1, chip: M4, memory_gb: 16}
  - {name: d, address: 127.0.0.1, chip: M4, memory_gb: 16}
models:
  - {name: chat, source: acme/chat, footprint_gb: 2, replicas: 2, hosts: [b, c, d]}
  - {name: other, source: acme/other, footprint_gb: 2, replicas: 1, hosts: [a]}
""")
    assert sorted(hosts_for("acme/chat", str(inventory))) == ["b", "c", "d"]
    with pytest.raises(ValueError, match="runs no model from 'acme/none'; its sources: acme/chat, acme/other"):
        hosts_for("acme/none", str(inventory))
