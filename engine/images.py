"""Image content parts -> decoded PIL images, safely.

Where an image may come from is the operator's decision, not the client's: ``data:`` URIs always;
local files only under directories the policy lists; remote ``http(s)`` URLs only when the policy
turns fetching on (off by default: a server that fetches any URL a client names is a proxy into the
network it runs in). Every source is bounded in encoded bytes, every image in decoded pixels and
every request in total pixels, all checked from the headers before any pixel is decoded. Anything
wrong is an ``InvalidRequestError`` (HTTP 400, ``param="messages"``) with one of these codes:

``invalid_image``          not base64, not an image, a format we do not decode, truncated data
``image_too_large``        too many encoded bytes, decoded pixels of one image or of the whole
                           request (or PIL's decompression-bomb guard)
``image_url_not_allowed``  a file outside the allowed directories, a remote URL with fetching off,
                           an unknown URL scheme (also as a redirect target), a remote host that
                           resolves to a loopback, private, link-local ... address not allow-listed
``image_fetch_failed``     fetching was allowed but the server could not get the image (network
                           error, HTTP error status, too many redirects, the deadline passed)
``too_many_images``        more images in one request than the policy allows

Remote fetches live in ``engine.image_fetch`` (server-side request forgery defences).

Runs on the caller's thread; no MLX here. Never hand a URL string to mlx-vlm: its ``load_image``
fetches any URL it is given.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import os
import urllib.parse
import warnings
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .image_fetch import IPNetwork, fetch_image, image_error, too_large


class ImagePolicy(BaseModel):
    """Where images may come from and how big they may be (``EngineConfig.images``)."""

    model_config = ConfigDict(extra="forbid")

    max_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Encoded bytes of one image (after base64 decoding).")
    max_pixels: int = Field(4096 * 4096, ge=1, description="Width x height of one decoded image.")
    max_total_pixels: int = Field(
        2 * 4096 * 4096, ge=1,
        description="Width x height summed over all images of one request, checked from the headers "
                    "before any image is decoded (decoded RGB costs 3 bytes a pixel).")
    max_images: int = Field(8, ge=0, description="Images in one request.")
    allowed_local_dirs: list[str] = Field(
        default_factory=list, description="Local paths (file:// or absolute) are read only under these directories.")
    allow_remote: bool = Field(
        False, description="Fetch http(s) image URLs. Off by default: the server is no proxy into its network.")
    fetch_timeout_s: float = Field(
        10.0, gt=0, description="Total time for one remote image: name lookup, connect, every redirect and "
                                "the whole body.")
    max_redirects: int = Field(3, ge=0, description="Redirects followed by a remote fetch (http(s) targets only).")
    allowed_remote_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs (e.g. 10.20.0.0/16) a remote fetch may reach although they are loopback, private, "
                    "link-local or otherwise not global. Empty: only global addresses are fetched from.")
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

    @field_validator("allowed_remote_networks")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        out = []
        for cidr in v:
            try:
                out.append(str(ipaddress.ip_network(cidr.strip(), strict=True)))
            except ValueError as e:
                raise ValueError(f"allowed_remote_networks entry {cidr!r} is not a network in CIDR form: {e}") from None
        return out

    def remote_networks(self) -> list[IPNetwork]:
        """``allowed_remote_networks`` parsed (validated at construction)."""
        return [ipaddress.ip_network(c) for c in self.allowed_remote_networks]


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
        return fetch_image(url, policy)
    shown = url if len(url) <= 64 else url[:61] + "..."
    raise image_error(f"unsupported image URL {shown!r}: use a data: URI"
                 + (", an http(s) URL" if policy.allow_remote else "")
                 + (" or a file path" if policy.allowed_local_dirs else ""), "image_url_not_allowed")


def _read_data_uri(url: str, policy: ImagePolicy) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise image_error("malformed data: URI (no comma before the data)", "invalid_image")
    params = header[len("data:"):].split(";")
    media_type = params[0].strip().lower()
    if media_type and not (media_type.startswith("image/") or media_type == "application/octet-stream"):
        raise image_error(f"data: URI media type {media_type!r} is not an image type", "invalid_image")
    if "base64" in (p.strip().lower() for p in params[1:]):
        # 4 base64 characters carry 3 bytes: refuse a payload too big before decoding it.
        approx = len(payload) // 4 * 3
        if approx > policy.max_bytes + 3:
            raise too_large("data", approx, policy.max_bytes)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise image_error(f"data: URI is not valid base64: {e}", "invalid_image") from e
    else:
        if len(payload) > 3 * policy.max_bytes:
            raise too_large("data", len(payload), policy.max_bytes)
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > policy.max_bytes:
        raise too_large("data", len(data), policy.max_bytes)
    if not data:
        raise image_error("data: URI holds no data", "invalid_image")
    return data


def _allowed_dirs(policy: ImagePolicy) -> list[str]:
    return [os.path.realpath(os.path.expanduser(d)) for d in policy.allowed_local_dirs]


def _read_local(url: str, policy: ImagePolicy) -> bytes:
    if url.lower().startswith("file:"):
        parts = urllib.parse.urlparse(url)
        if parts.netloc not in ("", "localhost"):
            raise image_error(f"file URL host {parts.netloc!r} is not local", "image_url_not_allowed")
        path = urllib.parse.unquote(parts.path)
    else:
        path = url
    dirs = _allowed_dirs(policy)
    if not dirs:
        raise image_error("local image paths are not allowed by this server (no allowed directories)",
                     "image_url_not_allowed")
    if not os.path.isabs(path):
        raise image_error(f"image path {path!r} is not absolute", "image_url_not_allowed")
    real = os.path.realpath(path)  # symlinks and .. resolved before the check
    if not any(os.path.commonpath([real, d]) == d for d in dirs):
        raise image_error(f"image path {path!r} is outside the allowed directories", "image_url_not_allowed")
    try:
        st = os.stat(real)
    except OSError:
        raise image_error(f"image file {path!r} does not exist or cannot be read", "invalid_image") from None
    if not Path(real).is_file():
        raise image_error(f"image path {path!r} is not a regular file", "invalid_image")
    if st.st_size > policy.max_bytes:
        raise too_large("file size", st.st_size, policy.max_bytes)
    try:
        with open(real, "rb") as f:
            data = f.read(policy.max_bytes + 1)
    except OSError as e:
        raise image_error(f"image file {path!r} cannot be read: {e.strerror}", "invalid_image") from None
    if len(data) > policy.max_bytes:  # it grew since stat
        raise too_large("file size", len(data), policy.max_bytes)
    return data


# -- decoding ------------------------------------------------------------------------------------
def decode_image_bytes(data: bytes, policy: ImagePolicy) -> Image.Image:
    """Decode ``data`` to an RGB image: size checked from the header first, then pixels loaded."""
    return decode_opened_image(open_image_header(data, policy), policy)


def open_image_header(data: bytes, policy: ImagePolicy) -> Image.Image:
    """``data`` opened as an image whose header alone has been read (``size`` known, no pixels
    decoded), its format and size within ``policy``."""
    if len(data) > policy.max_bytes:
        raise too_large("data", len(data), policy.max_bytes)
    try:
        with warnings.catch_warnings():
            # Our own pixel limit (below) decides; PIL's global guard still raises for 2x its limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=policy.formats or None)  # reads the header only
    except Image.DecompressionBombError as e:
        raise image_error(f"image is too large: {e}", "image_too_large") from None
    except UnidentifiedImageError:
        raise image_error("data is not an image in a supported format (" + ", ".join(policy.formats) + ")",
                     "invalid_image") from None
    except Exception as e:  # noqa: BLE001 - PIL plugins raise many types for malformed headers
        raise image_error(f"image cannot be read: {e}", "invalid_image") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise image_error(f"image has an empty size {width}x{height}", "invalid_image")
    if width * height > policy.max_pixels:
        raise image_error(f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
                     f"{policy.max_pixels:,}", "image_too_large")
    return img


def decode_opened_image(img: Image.Image, policy: ImagePolicy) -> Image.Image:
    """Decode the pixels of an ``open_image_header`` result: EXIF orientation applied, RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            if img.mode != "RGB":
                img = img.convert("RGB")
    except Image.DecompressionBombError as e:
        raise image_error(f"image is too large: {e}", "image_too_large") from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt pixel data
        raise image_error(f"image data is broken: {e}", "invalid_image") from None
    if img.width * img.height > policy.max_pixels:  # EXIF rotation keeps the area; belt and braces
        raise image_error(f"image is {img.width}x{img.height}, over the limit of {policy.max_pixels:,} pixels",
                     "image_too_large")
    return img


def open_request_images(urls: Sequence[str], policy: ImagePolicy) -> list[Image.Image]:
    """Every image of one request read and opened, none decoded, the request's total pixels within
    ``max_total_pixels``. Checked as each header arrives, so an over-budget request stops before
    fetching the rest; the pixels of all of them are decoded only after every check has passed."""
    opened: list[Image.Image] = []
    total = 0
    for url in urls:
        img = open_image_header(read_image_bytes(url, policy), policy)
        total += img.width * img.height
        if total > policy.max_total_pixels:
            raise image_error(f"the request's images hold more than {policy.max_total_pixels:,} pixels in all "
                         f"(the first {len(opened) + 1} of {len(urls)} already hold {total:,})", "image_too_large")
        opened.append(img)
    return opened


__all__ = [
    "ImagePolicy", "load_image", "read_image_bytes", "decode_image_bytes", "open_image_header",
    "decode_opened_image", "open_request_images",
]
