"""Image content parts -> decoded PIL images, safely.

Where an image may come from is the operator's decision, not the client's: ``data:`` URIs always;
local files only under directories the policy lists; remote ``http(s)`` URLs only when the policy
turns fetching on (off by default: a server that fetches any URL a client names is a proxy into the
network it runs in). Every source is bounded in encoded bytes, and every image in decoded pixels,
checked from the header before the pixels are decoded. Anything wrong is an ``InvalidRequestError``
(HTTP 400, ``param="messages"``) with one of these codes:

``invalid_image``          not base64, not an image, a format we do not decode, truncated data
``image_too_large``        too many encoded bytes or decoded pixels (or PIL's decompression-bomb guard)
``image_url_not_allowed``  a file outside the allowed directories, a remote URL with fetching off,
                           an unknown URL scheme
``image_fetch_failed``     fetching was allowed but the server could not get the image
``too_many_images``        more images in one request than the policy allows

Runs on the caller's thread; no MLX here. Never hand a URL string to mlx-vlm: its ``load_image``
fetches any URL it is given.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import InvalidRequestError

_PARAM = "messages"


class ImagePolicy(BaseModel):
    """Where images may come from and how big they may be (``EngineConfig.images``)."""

    model_config = ConfigDict(extra="forbid")

    max_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Encoded bytes of one image (after base64 decoding).")
    max_pixels: int = Field(4096 * 4096, ge=1, description="Width x height of one decoded image.")
    max_images: int = Field(8, ge=0, description="Images in one request.")
    allowed_local_dirs: list[str] = Field(
        default_factory=list, description="Local paths (file:// or absolute) are read only under these directories.")
    allow_remote: bool = Field(
        False, description="Fetch http(s) image URLs. Off by default: the server is no proxy into its network.")
    fetch_timeout_s: float = Field(10.0, gt=0, description="Connect and read timeout of one remote fetch.")
    max_redirects: int = Field(3, ge=0, description="Redirects followed by a remote fetch (http(s) targets only).")
    formats: list[str] = Field(
        default_factory=lambda: ["PNG", "JPEG", "WEBP", "GIF", "BMP"],
        description="PIL formats decoded; others (EPS runs Ghostscript, for one) are refused.")

    @field_validator("allowed_local_dirs")
    @classmethod
    def _absolute_dirs(cls, v: list[str]) -> list[str]:
        for d in v:
            if not os.path.isabs(os.path.expanduser(d)):
                raise ValueError(f"allowed_local_dirs entry {d!r} is not an absolute path")
        return v

    @field_validator("formats")
    @classmethod
    def _upper_formats(cls, v: list[str]) -> list[str]:
        return [f.upper() for f in v]


def _error(message: str, code: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=_PARAM, code=code)


def _too_large(what: str, size: int, limit: int) -> InvalidRequestError:
    return _error(f"image {what} is {size:,}, over the limit of {limit:,}", "image_too_large")


# -- sources -------------------------------------------------------------------------------------
def load_image(url: str, policy: ImagePolicy) -> Image.Image:
    """The image an ``image_url`` part names, decoded to RGB and fully loaded."""
    return decode_image_bytes(read_image_bytes(url, policy), policy)


def read_image_bytes(url: str, policy: ImagePolicy) -> bytes:
    """The encoded bytes behind ``url``, within ``policy`` (no decoding yet)."""
    url = url.strip()
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _read_data_uri(url, policy)
    if scheme == "file" or (not scheme and url.startswith("/")):
        return _read_local(url, policy)
    if scheme in ("http", "https"):
        return _fetch(url, policy)
    shown = url if len(url) <= 64 else url[:61] + "..."
    raise _error(f"unsupported image URL {shown!r}: use a data: URI"
                 + (", an http(s) URL" if policy.allow_remote else "")
                 + (" or a file path" if policy.allowed_local_dirs else ""), "image_url_not_allowed")


def _read_data_uri(url: str, policy: ImagePolicy) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise _error("malformed data: URI (no comma before the data)", "invalid_image")
    params = header[len("data:"):].split(";")
    media_type = params[0].strip().lower()
    if media_type and not (media_type.startswith("image/") or media_type == "application/octet-stream"):
        raise _error(f"data: URI media type {media_type!r} is not an image type", "invalid_image")
    if "base64" in (p.strip().lower() for p in params[1:]):
        # 4 base64 characters carry 3 bytes: refuse a payload too big before decoding it.
        approx = len(payload) // 4 * 3
        if approx > policy.max_bytes + 3:
            raise _too_large("data", approx, policy.max_bytes)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise _error(f"data: URI is not valid base64: {e}", "invalid_image") from e
    else:
        if len(payload) > 3 * policy.max_bytes:
            raise _too_large("data", len(payload), policy.max_bytes)
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > policy.max_bytes:
        raise _too_large("data", len(data), policy.max_bytes)
    if not data:
        raise _error("data: URI holds no data", "invalid_image")
    return data


def _allowed_dirs(policy: ImagePolicy) -> list[str]:
    return [os.path.realpath(os.path.expanduser(d)) for d in policy.allowed_local_dirs]


def _read_local(url: str, policy: ImagePolicy) -> bytes:
    if url.lower().startswith("file:"):
        parts = urllib.parse.urlparse(url)
        if parts.netloc not in ("", "localhost"):
            raise _error(f"file URL host {parts.netloc!r} is not local", "image_url_not_allowed")
        path = urllib.parse.unquote(parts.path)
    else:
        path = url
    dirs = _allowed_dirs(policy)
    if not dirs:
        raise _error("local image paths are not allowed by this server (no allowed directories)",
                     "image_url_not_allowed")
    if not os.path.isabs(path):
        raise _error(f"image path {path!r} is not absolute", "image_url_not_allowed")
    real = os.path.realpath(path)  # symlinks and .. resolved before the check
    if not any(os.path.commonpath([real, d]) == d for d in dirs):
        raise _error(f"image path {path!r} is outside the allowed directories", "image_url_not_allowed")
    try:
        st = os.stat(real)
    except OSError:
        raise _error(f"image file {path!r} does not exist or cannot be read", "invalid_image") from None
    if not Path(real).is_file():
        raise _error(f"image path {path!r} is not a regular file", "invalid_image")
    if st.st_size > policy.max_bytes:
        raise _too_large("file size", st.st_size, policy.max_bytes)
    try:
        with open(real, "rb") as f:
            data = f.read(policy.max_bytes + 1)
    except OSError as e:
        raise _error(f"image file {path!r} cannot be read: {e.strerror}", "invalid_image") from None
    if len(data) > policy.max_bytes:  # it grew since stat
        raise _too_large("file size", len(data), policy.max_bytes)
    return data


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, max_redirects: int) -> None:
        super().__init__()
        self.max_redirections = max_redirects

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        if urllib.parse.urlparse(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, "redirect to a non-http(s) URL refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, policy: ImagePolicy) -> bytes:
    if not policy.allow_remote:
        raise _error("remote image URLs are not allowed by this server; send the image as a data: URI",
                     "image_url_not_allowed")
    # Only http(s) handlers: no file://, ftp:// or data: reachable, not even through a redirect.
    # Proxies come from the environment (an egress proxy is how an operator limits where we go).
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(),
                    urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                    urllib.request.HTTPDefaultErrorHandler(), _HttpOnlyRedirects(policy.max_redirects),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    req = urllib.request.Request(url, headers={"User-Agent": "mlx-serving", "Accept": "image/*"})
    try:
        with opener.open(req, timeout=policy.fetch_timeout_s) as resp:
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                raise _too_large("download", int(declared), policy.max_bytes)
            data = resp.read(policy.max_bytes + 1)
    except InvalidRequestError:
        raise
    except urllib.error.HTTPError as e:
        raise _error(f"fetching the image failed: HTTP {e.code} {e.reason}", "image_fetch_failed") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise _error(f"fetching the image failed: {reason}", "image_fetch_failed") from None
    if len(data) > policy.max_bytes:
        raise _too_large("download", len(data), policy.max_bytes)
    return data


# -- decoding ------------------------------------------------------------------------------------
def decode_image_bytes(data: bytes, policy: ImagePolicy) -> Image.Image:
    """Decode ``data`` to an RGB image: size checked from the header first, then pixels loaded."""
    if len(data) > policy.max_bytes:
        raise _too_large("data", len(data), policy.max_bytes)
    try:
        with warnings.catch_warnings():
            # Our own pixel limit (below) decides; PIL's global guard still raises for 2x its limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=policy.formats or None)  # reads the header only
    except Image.DecompressionBombError as e:
        raise _error(f"image is too large: {e}", "image_too_large") from None
    except UnidentifiedImageError:
        raise _error("data is not an image in a supported format (" + ", ".join(policy.formats) + ")",
                     "invalid_image") from None
    except Exception as e:  # noqa: BLE001 - PIL plugins raise many types for malformed headers
        raise _error(f"image cannot be read: {e}", "invalid_image") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise _error(f"image has an empty size {width}x{height}", "invalid_image")
    if width * height > policy.max_pixels:
        raise _error(f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
                     f"{policy.max_pixels:,}", "image_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            if img.mode != "RGB":
                img = img.convert("RGB")
    except Image.DecompressionBombError as e:
        raise _error(f"image is too large: {e}", "image_too_large") from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt pixel data
        raise _error(f"image data is broken: {e}", "invalid_image") from None
    if img.width * img.height > policy.max_pixels:  # EXIF rotation keeps the area; belt and braces
        raise _error(f"image is {img.width}x{img.height}, over the limit of {policy.max_pixels:,} pixels",
                     "image_too_large")
    return img


__all__ = ["ImagePolicy", "load_image", "read_image_bytes", "decode_image_bytes"]
