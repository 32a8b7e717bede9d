"""Ray's internal KV as a dict (``deployments.gcs_kv``'s interface), failing on demand like an
unreachable GCS; and a clock a test moves by hand."""

from __future__ import annotations


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class DictKV:
    def __init__(self) -> None:
        self.data: dict[tuple[str, str], bytes] = {}
        self.broken = False

    def _reach(self) -> None:
        if self.broken:
            raise ConnectionError("GCS unreachable")

    def get(self, key: str, namespace: str) -> bytes | None:
        self._reach()
        return self.data.get((namespace, key))

    def put(self, key: str, value: bytes, namespace: str) -> None:
        self._reach()
        self.data[(namespace, key)] = value

    def keys(self, prefix: str, namespace: str) -> list[str]:
        self._reach()
        return [k for ns, k in self.data if ns == namespace and k.startswith(prefix)]

    def delete(self, key: str, namespace: str) -> None:
        self._reach()
        self.data.pop((namespace, key), None)
