"""API keys: stored as SHA-256 hashes, compared in constant time, resolved to a tenant.

Keys are long random strings (``mlx-serving keys new`` makes one), so a fast hash is enough: nothing
can be guessed from it, and config files, ``serve config`` and the dashboard then hold only hashes.
A key's hash also names its tenant (prefix-cache scope, logs) without revealing the key.
"""

from __future__ import annotations

import hashlib
import ipaddress
import hmac
import os
import re
import secrets
from typing import TYPE_CHECKING

from fastapi import Request


if TYPE_CHECKING:
    from ..config import AuthConfig

HASH_PREFIX = "sha256:"
HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
API_KEYS_ENV = "MLX_SERVING_API_KEYS"
ADMIN_KEYS_ENV = "MLX_SERVING_ADMIN_KEYS"
ANONYMOUS = "anonymous"  # the tenant of every request when no API key is configured


def hash_key(key: str) -> str:
    """``sha256:<hex>`` of a key, the form configs and user_configs hold."""
    return HASH_PREFIX + hashlib.sha256(key.strip().encode()).hexdigest()


def new_key() -> str:
    """A fresh API key: 256 random bits."""
    return "sk-mlx-" + secrets.token_urlsafe(32)


def env_key_hashes(env: str, environ: dict[str, str] | None = None) -> list[str]:
    """Hashes of the comma-separated keys in environment variable ``env`` (plain keys there)."""
    raw = (environ if environ is not None else os.environ).get(env, "")
    return [hash_key(k) for k in raw.split(",") if k.strip()]


def tenant_of(key_hash: str) -> str:
    """A short, stable, non-secret name for the key's holder."""
    return "key-" + key_hash.removeprefix(HASH_PREFIX)[:16]


class KeySet:
    """A set of key hashes; ``match`` says which one a presented key is, in constant time per key."""

    def __init__(self, hashes: list[str]) -> None:
        self._digests = [bytes.fromhex(h.removeprefix(HASH_PREFIX)) for h in dict.fromkeys(hashes)]
        self.hashes = list(dict.fromkeys(hashes))

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __add__(self, other: KeySet) -> KeySet:
        return KeySet(self.hashes + other.hashes)

    def match(self, presented: str) -> str | None:
        """The hash of ``presented`` if it is one of the keys, else None."""
        digest = hashlib.sha256(presented.strip().encode()).digest()
        found = None
        for i, d in enumerate(self._digests):  # compare with every key: timing tells nothing of which matched
            if hmac.compare_digest(digest, d):
                found = i
        return None if found is None else self.hashes[found]


def bearer(request: Request, what: str = "API key") -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        from .errors import AuthenticationError

        raise AuthenticationError(f"missing {what}: send 'Authorization: Bearer <key>'")
    return token.strip()


class Authenticator:
    """The ingress's key check, built from its ``user_config`` (hashes) and its own environment.

    Admin keys are API keys too, but alone they do not close the API: with no API key configured the
    API routes stay open and admin keys guard only /admin and the forced-variant header.
    """

    def __init__(self, auth: AuthConfig, environ: dict[str, str] | None = None) -> None:
        self.admin_keys = KeySet(auth.admin_keys + env_key_hashes(ADMIN_KEYS_ENV, environ))
        api = KeySet(auth.api_keys + [k.key for k in auth.keys] + env_key_hashes(API_KEYS_ENV, environ))
        self.api_keys = api + self.admin_keys if api else api
        self.allow_unauthenticated_network = auth.allow_unauthenticated_network

    def tenant(self, request: Request) -> str:
        """Who sends ``request`` (401 unless its key is valid, when keys are configured)."""
        return self.identify(request)[0]

    def identify(self, request: Request) -> tuple[str, str | None]:
        """The tenant of ``request`` and the hash of its key (None when no key is configured)."""
        from .errors import AuthenticationError

        if not self.api_keys:
            return ANONYMOUS, None
        found = self.api_keys.match(bearer(request))
        if found is None:
            raise AuthenticationError("invalid API key")
        return tenant_of(found), found

    def admin(self, request: Request) -> None:
        """401 without a valid key; 403 for a valid non-admin key, and when no admin key is configured."""
        from ..route_client import PermissionDeniedError
        from .errors import AuthenticationError

        if not self.admin_keys:
            raise PermissionDeniedError("the admin API is disabled: no admin keys are configured (set auth.admin_keys "
                                        "in the config or MLX_SERVING_ADMIN_KEYS)", code="admin_disabled")
        given = bearer(request, "admin key")
        if self.admin_keys.match(given) is not None:
            return
        if self.api_keys and self.api_keys.match(given) is not None:
            raise PermissionDeniedError("this API key is not an admin key")
        raise AuthenticationError("invalid admin key")


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may well be reachable from the network


def check_exposure(auth: Authenticator, http_host: str | None) -> None:
    """Refuse to serve an open API on an address beyond loopback, unless the config opts in."""
    if http_host is None or auth.api_keys or auth.allow_unauthenticated_network or is_loopback(http_host):
        return
    raise RuntimeError(
        f"refusing to serve: the HTTP proxy listens on {http_host}, beyond loopback, and no API key is configured, "
        "so anyone who reaches the port could use the models. Set API keys (MLX_SERVING_API_KEYS for `mlx-serving "
        "up`, or sha256 hashes in auth.api_keys), or opt in with `auth.allow_unauthenticated_network: true` "
        "(`mlx-serving up --allow-unauthenticated-network`).")
