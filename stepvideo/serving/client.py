"""HTTP clients of the caption and VAE services: `RemoteCaption(url)` and `RemoteVae(url)`.

    text = RemoteCaption("127.0.0.1")          # -> http://127.0.0.1:5000/caption-api
    vae = RemoteVae("gpu-node:6001", token=...)
    out = text.encode(["a cat", ""])          # CaptionOutput, exactly what LocalCaption gives
    video = vae.decode(latents)               # float32 (b, frames, 3, 16h, 16w)
    latents = vae.encode(image, seed=0)       # TI2V: (b, frames, 3, H, W) -> (b, T, 64, H/16, W/16)

A URL may be a host (the service's default port: caption 5000, VAE 5001), `host:port`,
`[ipv6]` / `[ipv6]:port`, or a full URL `http(s)://host[:port][/path]` (taken literally:
no port means the scheme's; a path is a prefix unless it already ends with the endpoint).

While a service is starting it refuses connections, and while it loads its
models it answers 503 {"status": "loading"}; in both cases the client retries
for up to `connect_wait` seconds, saying so once, then fails with a message
that names the service and the URL. Any error from the service (4xx: the request
was wrong; 5xx: the model failed) raises `ServiceError` with the server's own
message.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import time
from typing import Optional, Sequence
from urllib.parse import urlsplit

import httpx
import numpy as np

from stepvideo.serving import wire
from stepvideo.contracts import check_latents, check_prompts, check_seed, check_video
from stepvideo.diffusion.interfaces import CaptionOutput, TextEncoding, VideoDecoding, VideoEncoding
from stepvideo.serving.wire import (CAPTION_PATH, DEFAULT_PORTS, HEALTH_PATH, TOKEN_ENV, VAE_ENCODE_PATH, VAE_PATH,
                                    check_token)

log = logging.getLogger(__name__)

_ENDPOINTS = {"caption": CAPTION_PATH, "vae": VAE_PATH}
# An error body is a short JSON message; never read more of it than this.
_MAX_ERROR_BYTES = 64 * 1024
# A caption answer per prompt: y (320 x hidden float32), the mask, the CLIP states (77 x hidden).
# The published models take 8.2 MB; this allows hidden sizes up to ~24k.
_MAX_CAPTION_BYTES_PER_PROMPT = 32 * 2**20


class ServiceError(RuntimeError):
    """A service could not be reached or answered with an error.

    service: "caption" or "vae"; url: the endpoint; status: the HTTP status (None if
    there was no answer); message: the server's message or what went wrong.
    """

    def __init__(self, service: str, url: str, message: str, status: Optional[int] = None):
        self.service, self.url, self.status, self.message = service, url, status, message
        where = f"{service} service at {url}"
        super().__init__(f"{where}: HTTP {status}: {message}" if status is not None else f"{where}: {message}")


def service_url(url: str, service: str) -> str:
    """The endpoint URL of `service` ("caption" or "vae") for a user-given URL (see the module docstring)."""
    if service not in _ENDPOINTS:
        raise ValueError(f"service must be one of {sorted(_ENDPOINTS)}, got {service!r}")
    endpoint, default_port = _ENDPOINTS[service], DEFAULT_PORTS[service]
    if not isinstance(url, str) or not url.strip() or any(c.isspace() for c in url.strip()):
        raise ValueError(f"{service} URL must be a host, host:port or http://host:port, got {url!r}")
    url = url.strip()
    if "://" not in url:
        try:  # a bare IPv6 address, e.g. ::1
            if ipaddress.ip_address(url).version == 6:
                url = f"[{url}]"
        except ValueError:
            pass
        url = f"http://{url}"
        literal = False
    else:
        literal = True
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{service} URL {url!r}: scheme must be http or https")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{service} URL {url!r}: expected no user, query or fragment")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{service} URL {url!r}: {e}") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"{service} URL {url!r} has no host")
    if port == 0:
        raise ValueError(f"{service} URL {url!r}: port 0 is not a port to connect to")
    if port is None and not literal:
        port = default_port
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{port}" if port is not None else ""
    path = parts.path.rstrip("/")
    other = [p for s, p in _ENDPOINTS.items() if s != service]
    if any(path.endswith(p) for p in other):
        raise ValueError(f"{service} URL {url!r} names the endpoint of the other service")
    if not path.endswith(endpoint):
        path += endpoint
    return f"{parts.scheme}://{netloc}{path}"


class _RemoteService:
    """What both clients share: URL, token, timeouts, retries while the service loads, errors."""

    service = ""

    def __init__(self, url: str, *, token: Optional[str] = None, timeout: float = 12000.0,
                 connect_timeout: float = 10.0, connect_wait: float = 600.0, retry_interval: float = 2.0,
                 max_response_bytes: int = 16 * 2**30):
        """url: see the module docstring; token: shared secret (default: env STEPVIDEO_API_TOKEN);
        timeout: seconds to wait for an answer (a long decode on a slow device takes many minutes);
        connect_timeout: per connection attempt; connect_wait: total seconds to keep retrying while
        the service refuses connections (still loading); max_response_bytes: refuse larger answers.
        """
        self.url = service_url(url, self.service)
        self.health_url = self.url[: -len(_ENDPOINTS[self.service])] + HEALTH_PATH
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self._headers = {"authorization": f"Bearer {check_token(token)}"} if token is not None else {}
        for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout),
                            ("connect_wait", connect_wait), ("retry_interval", retry_interval)):
            if not isinstance(value, (int, float)) or value < 0 or value != value:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        self.connect_wait = float(connect_wait)
        self.retry_interval = float(retry_interval)
        self.max_response_bytes = int(max_response_bytes)
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self._client = httpx.Client(timeout=self._timeout, headers=self._headers, trust_env=False)

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # ------------------------------------------------------------------ transport

    def _send(self, method: str, url: str, **kwargs) -> httpx.Response:
        """Send, retrying only while the connection is refused (the service may still be loading)."""
        deadline = time.monotonic() + self.connect_wait
        warned = False
        while True:
            try:
                request = self._client.build_request(method, url, **kwargs)
                response = self._client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServiceError(self.service, url, f"not reachable ({e or type(e).__name__}) after trying for "
                                       f"{self.connect_wait:g} s; is the service running? Start it with "
                                       f"`python api/call_remote_server.py --model_dir DIR` and pass the URL it "
                                       "prints") from None
                if not warned:
                    log.warning("%s service at %s is not accepting connections yet (%s); retrying for up to %g s "
                                "(it may still be loading its models)", self.service, url, e or type(e).__name__,
                                self.connect_wait)
                    warned = True
                time.sleep(min(self.retry_interval, max(left, 0.0)))
            except httpx.TimeoutException as e:
                raise ServiceError(self.service, url, f"no answer within the timeout ({type(e).__name__}); "
                                   "raise the client's timeout for long decodes") from None
            except httpx.HTTPError as e:
                raise ServiceError(self.service, url, f"request failed: {type(e).__name__}: {e}") from None
            else:
                if response.status_code != 503:
                    return response
                message, loading = self._unavailable(response)
                left = deadline - time.monotonic()
                if not loading or left <= 0:
                    raise ServiceError(self.service, url, message if not loading else
                                       f"still loading its models after waiting {self.connect_wait:g} s", 503)
                if not warned:
                    log.warning("%s service at %s is still loading its models; retrying for up to %g s",
                                self.service, url, self.connect_wait)
                    warned = True
                time.sleep(min(self.retry_interval, max(left, 0.0)))

    def _unavailable(self, response: httpx.Response) -> tuple:
        """(message, loading) of a 503 answer; loading: the service says it is still loading its models."""
        body = self._read(response, _MAX_ERROR_BYTES)
        try:
            answer = json.loads(bytes(body).decode("utf-8"))
        except ValueError:
            return bytes(body[:500]).decode("utf-8", "replace") or response.reason_phrase, False
        if not isinstance(answer, dict):
            return str(answer)[:500], False
        return str(answer.get("error", answer)), answer.get("status") == "loading"

    def _read(self, response: httpx.Response, limit: int) -> bytearray:
        """The answer's body, at most `limit` bytes.

        The buffer grows as data arrives (a declared Content-Length is checked against `limit`
        but never allocated up front), so a peer that declares gigabytes and sends a few
        bytes costs a few bytes.
        """
        url = str(response.url)
        declared = response.headers.get("content-length")
        try:
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                raise ServiceError(self.service, url, f"answer of {declared} bytes exceeds the {limit} bytes "
                                   "this request can need (client limit)", response.status_code)
            body = bytearray()
            for chunk in response.iter_bytes():
                if len(body) + len(chunk) > limit:
                    raise ServiceError(self.service, url, f"answer exceeds the {limit} bytes this request can "
                                       "need (client limit)", response.status_code)
                body += chunk
        except httpx.TimeoutException as e:
            raise ServiceError(self.service, url, f"answer stalled ({type(e).__name__})") from None
        except httpx.HTTPError as e:
            raise ServiceError(self.service, url, f"answer broken off: {type(e).__name__}: {e}") from None
        finally:
            response.close()
        return body

    def _error_message(self, response: httpx.Response) -> str:
        body = self._read(response, _MAX_ERROR_BYTES)
        try:
            answer = json.loads(bytes(body).decode("utf-8"))
            message, request_id = answer["error"], answer.get("request_id")
            if isinstance(message, str):
                # A 500 says only "internal error"; its id finds the traceback in the service's log.
                return f"{message} (request id {request_id}; see the service log)" if request_id else message
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        return bytes(body[:500]).decode("utf-8", "replace") or response.reason_phrase

    def _post(self, content: bytes, content_type: str, answer_bytes: int, url: Optional[str] = None) -> bytearray:
        """POST to `url` (default: the service's URL) and return the answer's body;
        `answer_bytes`: the most this request's answer can take."""
        url = url or self.url
        response = self._send("POST", url, content=content, headers={"content-type": content_type})
        if response.status_code != 200:
            raise ServiceError(self.service, url, self._error_message(response), response.status_code)
        got = response.headers.get("content-type", "")
        if got.split(";")[0].strip() != wire.MEDIA_TYPE:
            response.close()
            raise ServiceError(self.service, url, f"answer has Content-Type {got!r}, expected "
                               f"{wire.MEDIA_TYPE} (is this URL a Step-Video service?)", 200)
        return self._read(response, min(self.max_response_bytes, answer_bytes))

    def _decode(self, body: bytearray, specs: Sequence[wire.TensorSpec]) -> dict:
        try:
            return wire.decode(body, specs, source="answer")
        except wire.WireError as e:
            raise ServiceError(self.service, self.url, f"unexpected answer: {e}", 200) from None

    def health(self) -> dict:
        """The service's /health JSON (one attempt, no retries)."""
        try:
            response = self._client.get(self.health_url, timeout=self._timeout.connect or 10.0)
        except httpx.HTTPError as e:
            raise ServiceError(self.service, self.health_url, f"not reachable: {type(e).__name__}: {e}") from None
        if response.status_code != 200:
            raise ServiceError(self.service, self.health_url, response.text[:500], response.status_code)
        return response.json()


class RemoteCaption(_RemoteService, TextEncoding):
    """The caption service (Step-LLM + CLIP) over HTTP."""

    service = "caption"

    def encode(self, prompts: Sequence[str]) -> CaptionOutput:
        prompts = check_prompts(prompts)
        b = len(prompts)
        body = self._post(wire.encode_prompts(prompts), wire.JSON_MEDIA_TYPE, b * _MAX_CAPTION_BYTES_PER_PROMPT)
        floats = ("F32", "BF16")
        out = self._decode(body, [wire.TensorSpec("y", ("b", "L", "H"), floats, sizes=(b,)),
                                  wire.TensorSpec("y_mask", ("b", "L_clip+L"), ("I64",), sizes=(b,)),
                                  wire.TensorSpec("clip_embedding", ("b", "L_clip", "H_clip"), floats, sizes=(b,))])
        return CaptionOutput(y=out["y"], y_mask=out["y_mask"], clip_embedding=out["clip_embedding"])


class RemoteVae(_RemoteService, VideoDecoding, VideoEncoding):
    """The VAE service over HTTP: decode, and encode (TI2V's first image) at the service's encode endpoint."""

    service = "vae"

    @property
    def encode_url(self) -> str:
        return self.url[: -len(VAE_PATH)] + VAE_ENCODE_PATH

    def encode(self, video: np.ndarray, seed: int = 0) -> np.ndarray:
        x = check_video(video)
        b, frames, _, h, w = x.shape
        answer_bytes = 8 + wire.MAX_HEADER_BYTES + b * (frames + 2) * 64 * (h // 16) * (w // 16) * 4  # T <= frames + 2
        body = self._post(wire.encode({"videos": x, "seed": np.array([check_seed(seed)], np.int64)}),
                          wire.MEDIA_TYPE, answer_bytes, url=self.encode_url)
        spec = wire.TensorSpec("latents", ("b", "T", "c", "h", "w"), ("F32", "BF16"),
                               sizes=(b, None, None, h // 16, w // 16))
        return self._decode(body, [spec])["latents"]

    def decode(self, latents: np.ndarray) -> np.ndarray:
        z = check_latents(latents)
        b, t, _, h, w = z.shape
        frames = sum(8 * min(3, t - s) - 7 for s in range(0, t, 3))  # 3 latents -> 17 frames, n < 3 -> 8n - 7
        answer_bytes = 8 + wire.MAX_HEADER_BYTES + b * frames * 3 * 16 * h * 16 * w * 4  # float32 at most
        body = self._post(wire.encode({"samples": z}), wire.MEDIA_TYPE, answer_bytes)
        spec = wire.TensorSpec("video", ("b", "frames", "c", "H", "W"), ("F32", "BF16"),
                               sizes=(z.shape[0], None, None, 16 * z.shape[3], 16 * z.shape[4]))
        return self._decode(body, [spec])["video"]
