"""Ray's internal key-value store (the GCS), behind a small interface that tests can replace.

Values live as long as the Ray cluster and every connected worker reaches them. Calls block on the
GCS: callers run them on a thread, never on an event loop.
"""

from __future__ import annotations

from typing import Protocol


class KVBackend(Protocol):
    def get(self, key: str, namespace: str) -> bytes | None: ...

    def put(self, key: str, value: bytes, namespace: str) -> None: ...


class ListingKVBackend(KVBackend, Protocol):
    def keys(self, prefix: str, namespace: str) -> list[str]: ...

    def delete(self, key: str, namespace: str) -> None: ...


class RayInternalKV:
    """Ray's internal KV, as every worker of a connected Ray process can reach it."""

    def get(self, key: str, namespace: str) -> bytes | None:
        from ray.experimental.internal_kv import _internal_kv_get

        return _internal_kv_get(key, namespace=namespace)

    def put(self, key: str, value: bytes, namespace: str) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(key, value, overwrite=True, namespace=namespace)

    def keys(self, prefix: str, namespace: str) -> list[str]:
        from ray.experimental.internal_kv import _internal_kv_list

        return [k.decode() if isinstance(k, bytes) else k for k in _internal_kv_list(prefix, namespace=namespace)]

    def delete(self, key: str, namespace: str) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(key, namespace=namespace)

    @staticmethod
    def available() -> bool:
        """False outside a Ray worker (e.g. Serve's local testing mode): no store to reach."""
        try:
            from ray.experimental.internal_kv import _internal_kv_initialized

            return bool(_internal_kv_initialized())
        except Exception:  # noqa: BLE001 - no Ray, no store
            return False
