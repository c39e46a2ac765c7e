"""The caption and VAE services as one FastAPI app, built from already-loaded models.

    app = create_app(caption=LocalCaption(...), vae=LocalVae(...), token="secret")

Endpoints (each model is optional; a process may serve either or both):

    POST /caption-api   JSON {"prompts": [...]}            -> safetensors: y, y_mask, clip_embedding
    POST /vae-api       safetensors: samples (b,T,64,h,w)  -> safetensors: video (b,frames,3,16h,16w)
    POST /vae-encode-api  safetensors: videos (b,frames,3,H,W), seed (1,) int64
                                                           -> safetensors: latents (b,T,64,H/16,W/16)
    GET  /health        JSON: models loaded, device, dtype, busy

The original services unpickled request bodies and answered every failure
with HTTP 200 and a `None`; here bad input gets a 4xx with a JSON body
{"error": "..."} that says what was wrong, and the service keeps serving. A
model failure is a 500 that says only "internal error" and a request id; the
log pairs the id with the traceback. Checks, in order: connections (503 past
`max_connections`), token (if one is set), content type, declared and streamed
body size (413 before the body is read past the limit) and time (408 when it
has not arrived within `body_timeout_s`), the payload itself
(`stepvideo.serving.wire`), its memory estimate (413 over `max_memory_bytes`,
`stepvideo.serving.costs`), then room in the queue for the model (503 when
`max_waiting` requests already wait). A queued request whose client
disconnects is dropped before it runs.

Model work runs on one worker thread, off the event loop: the device runs one
request at a time (two models on one accelerator at once risk running out of
its memory, and we do not rely on MindSpore running two networks from two
threads at once), while /health and request parsing stay responsive.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hmac
import ipaddress
import json
import logging
import os
import select
import socket
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from stepvideo.contracts import check_seed, check_video_shape
from stepvideo.serving import wire
from stepvideo.serving.costs import CaptionCost, Estimate, OverBudget, VaeCost, check_budget

if TYPE_CHECKING:  # the models come in built; importing them here would pull in MindSpore
    from stepvideo.diffusion.interfaces import TextEncoding, VideoDecoding

log = logging.getLogger(__name__)

CAPTION_PATH, VAE_PATH, HEALTH_PATH = wire.CAPTION_PATH, wire.VAE_PATH, wire.HEALTH_PATH
VAE_ENCODE_PATH = wire.VAE_ENCODE_PATH
TOKEN_ENV = wire.TOKEN_ENV

# A 204-frame 544x992 video has latents (1, 36, 64, 34, 62): 19.4 MB in float32.
DEFAULT_MAX_BODY_MB = 64.0
# Responses up to this size are sent in one piece; larger ones are streamed in chunks.
_STREAM_ABOVE_BYTES = 8 * 1024 * 1024
# Connections that may wait for accept() (uvicorn's default).
_BACKLOG = 2048


@dataclass(frozen=True)
class Limits:
    """What a request may ask for, and how long and how many may be in flight.

    Latents: the largest video the model makes is 204 frames at 992 x 992 (or 544 x 992),
    latents (1, 36, 64, 62, 62); the limits admit 1.5x its frames (T <= 54: 306 frames) and
    1024-pixel sides (h, w <= 64), batch 4. Within those, `max_memory_bytes` bounds what a
    request may make the model hold (`stepvideo.serving.costs`; None: not checked).
    """

    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20)
    max_prompts: int = 64
    max_prompt_chars: int = 16384
    max_batch: int = 4
    max_latent_frames: int = 54  # T; 3 latents decode to 17 frames
    max_latent_side: int = 64  # h and w; 16 pixels each
    max_latent_elements: int = 16 * 2**20  # b*T*64*h*w; the 204 x 992 x 992 video has 8.9M
    max_waiting: int = 32  # requests queued for the model; more get 503 (each holds its body in memory)
    max_memory_bytes: Optional[int] = None  # what one request may make the model hold (weights included)
    body_timeout_s: float = 60.0  # the whole body must arrive within this, or 408
    max_connections: int = 32  # open connections; more get 503
    shutdown_grace_s: float = 30.0  # after SIGTERM: how long the running job may still take
    # VAE encode (TI2V's first image; one frame is the usual request). Its cost grows with
    # b*frames*H*W like a decode's with its output.
    max_video_frames: int = 17 * 18  # as max_latent_frames (54 latents) in frames
    max_video_side: int = 16 * 64  # H and W, as max_latent_side in pixels
    max_video_elements: int = 32 * 2**20  # b*frames*3*H*W

    def videos_spec(self) -> wire.TensorSpec:
        return wire.TensorSpec("videos", ("b", "frames", "c", "H", "W"), ("F32", "BF16", "F16"),
                               sizes=(None, None, 3, None, None),
                               max_sizes=(self.max_batch, self.max_video_frames, None,
                                          self.max_video_side, self.max_video_side))

    def samples_spec(self, channels: int) -> wire.TensorSpec:
        return wire.TensorSpec("samples", ("b", "T", "c", "h", "w"), ("F32", "BF16", "F16"),
                               sizes=(None, None, channels, None, None),
                               max_sizes=(self.max_batch, self.max_latent_frames, None,
                                          self.max_latent_side, self.max_latent_side))


@dataclass(frozen=True)
class Costs:
    """How to estimate each endpoint's memory from a request (None: that endpoint is not costed)."""

    vae: Optional[VaeCost] = None
    caption: Optional[CaptionCost] = None


def check_cost(estimate: Estimate, limits: Limits) -> None:
    """Refuse with 413 (naming the estimate and the limit) work that would need more than --max_memory_gb."""
    if limits.max_memory_bytes is None:
        return
    try:
        check_budget(estimate, limits.max_memory_bytes)
    except OverBudget as e:
        raise ApiError(413, str(e)) from None


class ApiError(Exception):
    """An HTTP error answered as {"error": message} (and "request_id" when one is given)."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None,
                 request_id: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.headers, self.request_id = status, message, headers, request_id


class _ModelWorker:
    """Runs model calls one at a time on a single thread and reports what it is doing.

    A queued call can be dropped (`cancel`: its client went away) and, once the service is
    stopping (`close`), every queued call is dropped and new ones are refused; a call
    already running on the device is never interrupted.
    """

    def __init__(self):
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stepvideo-model")
        self._lock = threading.Lock()
        self._queued: set = set()
        self.closing = False
        self.running: Optional[str] = None
        self.waiting = 0
        self.served: Dict[str, int] = {}
        self.failed: Dict[str, int] = {}
        self.dropped = 0

    def submit(self, what: str, fn: Callable, *args, max_waiting: int) -> concurrent.futures.Future:
        with self._lock:
            if self.closing:
                raise ApiError(503, "the service is shutting down", headers={"Retry-After": "5"})
            if self.waiting >= max_waiting:
                raise ApiError(503, f"{self.waiting} requests are already waiting for the model; try again later",
                               headers={"Retry-After": "5"})
            self.waiting += 1

        def job():
            with self._lock:
                self._queued.discard(future)
                self.waiting -= 1
                self.running = what
            try:
                result = fn(*args)
                with self._lock:
                    self.served[what] = self.served.get(what, 0) + 1
                return result
            except BaseException:
                with self._lock:
                    self.failed[what] = self.failed.get(what, 0) + 1
                raise
            finally:
                with self._lock:
                    self.running = None

        with self._lock:  # job() takes the lock first, so it cannot start before `future` is known
            future = self._executor.submit(job)
            self._queued.add(future)
        return future

    def cancel(self, future: concurrent.futures.Future) -> bool:
        """Drop a call that has not started; False if it is running or done."""
        with self._lock:
            if future not in self._queued or not future.cancel():
                return False
            self._queued.discard(future)
            self.waiting -= 1
            self.dropped += 1
            return True

    def close(self) -> int:
        """Refuse new calls and drop the queued ones; returns how many were dropped."""
        with self._lock:
            self.closing = True
            queued = list(self._queued)
        return sum(self.cancel(f) for f in queued)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self.running is not None

    def status(self) -> dict:
        with self._lock:
            return {"busy": self.running is not None or self.waiting > 0, "running": self.running,
                    "waiting": self.waiting, "served": dict(self.served), "failed": dict(self.failed),
                    "dropped": self.dropped}

    def shutdown(self) -> None:
        self.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _media_type(request: Request) -> tuple:
    """(type/subtype lower-case, {param: value}) of the request's Content-Type."""
    raw = request.headers.get("content-type", "")
    main, *params = raw.split(";")
    values = {}
    for p in params:
        key, _, value = p.partition("=")
        values[key.strip().lower()] = value.strip().strip('"').lower()
    return main.strip().lower(), values


def _require_media_type(request: Request, expected: str) -> None:
    got, params = _media_type(request)
    if got != expected:
        raise ApiError(415, f"Content-Type must be {expected}, got {request.headers.get('content-type', 'none')!r}")
    charset = params.get("charset")
    if charset is not None and charset not in ("utf-8", "utf8"):
        raise ApiError(415, f"charset must be utf-8, got {charset!r}")


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytearray:
    """The body, refused with 413 as soon as its declared or received size passes `limit`,
    and with 408 if it has not fully arrived `timeout_s` seconds after the headers."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length must be a non-negative integer, got {declared!r}")
        if int(declared) > limit:
            raise ApiError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes "
                                "(server option --max_body_mb)")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"request body exceeds the limit of {limit} bytes "
                                        "(server option --max_body_mb)")
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s ({len(body)} bytes came; "
                            "server option --body_timeout)", headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before sending the whole body") from None
    if not body:
        raise ApiError(400, "empty request body")
    return body


def _tensor_response(tensors: Dict[str, np.ndarray]) -> Response:
    total, parts = wire.encode_parts(tensors)
    if total <= _STREAM_ABOVE_BYTES:
        return Response(b"".join(parts), media_type=wire.MEDIA_TYPE)
    return StreamingResponse(wire.iter_chunks(parts), media_type=wire.MEDIA_TYPE,
                             headers={"content-length": str(total)})


def _error(status: int, message: str, headers: Optional[Dict[str, str]] = None,
           request_id: Optional[str] = None) -> JSONResponse:
    body = {"error": message, **({"request_id": request_id} if request_id else {})}
    return JSONResponse(body, status_code=status, headers=headers)


def _internal_error(context: str) -> ApiError:
    """A 500 that says only "internal error" and a request id; the log pairs the id with the traceback.

    Call from an `except` block. Exception texts can carry internals (MindSpore's C++ call
    stack, paths, shapes of other users' data), so none of it goes to the client.
    """
    request_id = uuid.uuid4().hex[:16]
    log.exception("request %s: %s", request_id, context)
    return ApiError(500, "internal error", headers={"X-Request-Id": request_id}, request_id=request_id)


async def _client_gone(request: Request) -> None:
    """Return once the client has closed its connection (the body must have been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _run_for_client(worker: "_ModelWorker", request: Request, what: str, fn: Callable, arg,
                          max_waiting: int):
    """fn(arg) on the model worker for this request; if the client goes away while the call is
    still queued, the call is dropped without running (a running call is left to finish)."""
    future = worker.submit(what, fn, arg, max_waiting=max_waiting)
    result = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not result.done():
        if worker.cancel(future):
            log.info("dropped a queued %s job: its client disconnected", what)
        else:
            log.info("the client of the running %s job disconnected; the job finishes", what)
            # Nobody awaits it any more: take its outcome so asyncio does not report it as lost.
            result.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise ApiError(400, "the client disconnected")  # nobody reads it
    if result.cancelled():
        raise ApiError(503, "the service is shutting down; the request was dropped before it ran",
                       headers={"Retry-After": "5"})
    return result.result()


def create_app(caption: Optional[TextEncoding] = None, vae: Optional[VideoDecoding] = None, *,
               token: Optional[str] = None, limits: Limits = Limits(), device: str = "CPU",
               dtype: str = "float32", vae_channels: int = 64, costs: Optional[Costs] = None) -> FastAPI:
    """The services for the given models (at least one). `token`: require "Authorization: Bearer <token>";
    `costs`: memory estimates checked against `limits.max_memory_bytes` before a request runs."""
    if caption is None and vae is None:
        raise ValueError("create_app needs a caption model, a VAE, or both")
    expected_auth = f"Bearer {wire.check_token(token)}".encode("ascii") if token is not None else None
    # The VAE also encodes (TI2V's first image) when it has `encode(video, seed)`, as LocalVae does.
    encoder = vae if callable(getattr(vae, "encode", None)) else None
    worker = _ModelWorker()
    costs = costs or Costs()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        worker.shutdown()

    app = FastAPI(title="Step-Video caption / VAE services", docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False, lifespan=lifespan)

    app.state.model_worker = worker  # for `serve`: dropped queue and grace period on SIGTERM
    app.state.limits = limits

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return _error(exc.status, exc.message, exc.headers, exc.request_id)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        try:
            raise exc
        except Exception:  # noqa: BLE001 - logged with its traceback, answered without it
            error = _internal_error(f"{request.method} {request.url.path} failed")
        return _error(error.status, error.message, error.headers, error.request_id)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 404:
            message = (f"no endpoint {request.url.path!r}; this service has "
                       f"{', '.join(p for p, on in ((CAPTION_PATH, caption), (VAE_ENCODE_PATH, encoder), (VAE_PATH, vae)) if on)}"
                       f" and {HEALTH_PATH}")
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path} (use POST; GET only for {HEALTH_PATH})"
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    def check_token(request: Request) -> None:
        if expected_auth is None:
            return
        given = request.headers.get("authorization", "").encode("latin-1", "replace")  # as it came
        if not hmac.compare_digest(given, expected_auth):
            raise ApiError(401, "missing or wrong token: send the header 'Authorization: Bearer <token>' with the "
                                f"service's token (client option token=, or env {TOKEN_ENV})",
                           headers={"WWW-Authenticate": "Bearer"})

    def not_served(what: str, flag: str) -> ApiError:
        return ApiError(404, f"this service does not run the {what} (start it with {flag} True)")

    @app.get(HEALTH_PATH)
    async def health():
        return {"status": "ok", "models": {"caption": caption is not None, "vae": vae is not None},
                "device": device, "dtype": dtype, **worker.status()}

    async def run_model(request: Request, job: str, fn, arg, failure: str, context: str):
        """fn(arg) on the model worker; a model exception becomes a 500 "internal error" (logged)."""
        try:
            return await _run_for_client(worker, request, job, fn, arg, limits.max_waiting)
        except ApiError:
            raise
        except Exception:  # noqa: BLE001 - any model failure becomes a 500; the log has the traceback
            raise _internal_error(f"{failure} {context}") from None

    @app.post(CAPTION_PATH)
    async def caption_api(request: Request):
        if caption is None:
            raise not_served("caption model", "--enable_llm")
        check_token(request)
        _require_media_type(request, wire.JSON_MEDIA_TYPE)
        body = await _read_body(request, limits.max_body_bytes, limits.body_timeout_s)
        try:
            prompts = wire.decode_prompts(body, max_prompts=limits.max_prompts,
                                          max_prompt_chars=limits.max_prompt_chars)
        except wire.WireError as e:
            raise ApiError(400, str(e)) from None
        if costs.caption is not None:
            check_cost(costs.caption.encode(len(prompts)), limits)
        out = await run_model(request, "caption", caption.encode, prompts, "caption model failed",
                              f"on {len(prompts)} prompt(s)")
        return _tensor_response(out.as_dict())

    @app.post(VAE_PATH)
    async def vae_api(request: Request):
        if vae is None:
            raise not_served("VAE", "--enable_vae")
        check_token(request)
        _require_media_type(request, wire.MEDIA_TYPE)
        body = await _read_body(request, limits.max_body_bytes, limits.body_timeout_s)
        try:
            samples = wire.decode(body, [limits.samples_spec(vae_channels)],
                                  max_elements=limits.max_latent_elements, source="request body")["samples"]
        except wire.WireError as e:
            raise ApiError(400, str(e)) from None
        if costs.vae is not None:
            check_cost(costs.vae.decode(samples.shape), limits)
        if not np.isfinite(samples).all():
            raise ApiError(400, "samples contain NaN or infinite values")
        video = await run_model(request, "vae", vae.decode, samples, "VAE decode failed",
                                f"on samples of shape {samples.shape}")
        return _tensor_response({"video": video})

    @app.post(VAE_ENCODE_PATH)
    async def vae_encode_api(request: Request):
        """TI2V: encode videos (a first image is one frame) to latents, noise drawn from the given seed."""
        if encoder is None:
            raise not_served("VAE encoder", "--enable_vae")
        check_token(request)
        _require_media_type(request, wire.MEDIA_TYPE)
        body = await _read_body(request, limits.max_body_bytes, limits.body_timeout_s)
        try:
            got = wire.decode(body, [limits.videos_spec(), wire.TensorSpec("seed", ("n",), ("I64",), sizes=(1,))],
                              max_elements=limits.max_video_elements + 1, source="request body")
            check_video_shape(got["videos"].shape, what="videos")
            seed = check_seed(int(got["seed"][0]))
        except ValueError as e:  # a WireError is a ValueError too
            raise ApiError(400, str(e)) from None
        videos = got["videos"]
        if costs.vae is not None:
            check_cost(costs.vae.encode(videos.shape), limits)
        if not np.isfinite(videos).all():
            raise ApiError(400, "videos contain NaN or infinite values")
        latents = await run_model(request, "vae-encode", lambda x: encoder.encode(x, seed=seed), videos,
                                  "VAE encode failed", f"on videos of shape {videos.shape}")
        return _tensor_response({"latents": latents})

    return app


# --------------------------------------------------------------------------- running


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port and already listening; port 0 picks a free port.

    Listening at once, before any model loads, holds the port: a second service on
    the same port fails here within a second (SO_REUSEADDR only lets a restarted
    service reuse a port whose old connections linger in TIME_WAIT; it never lets two
    sockets share a listening port). Connections that arrive while the models load
    are answered by `LoadingResponder`.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve host {host!r}: {e}") from None
    family, socktype, proto, _, address = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
    except OSError as e:
        sock.close()
        hint = " (another service already uses this port: stop it, or choose another with --port)" \
            if e.errno == errno.EADDRINUSE else ""
        raise OSError(f"cannot bind {host}:{port}: {e.strerror or e}{hint}") from None
    return sock


def loading_health(models: Dict[str, bool]) -> dict:
    """The /health JSON while the models load (HTTP 503): which models this service will have."""
    return {"status": "loading", "models": dict(models)}


class LoadingResponder:
    """Answers on the listening socket while the models load, then hands the socket to uvicorn.

    GET /health gets 503 {"status": "loading", "models": {...}}; anything else gets
    503 {"status": "loading", "error": ...} with Retry-After, so a client knows to
    wait rather than fail. A request body is read and dropped (up to `max_body_bytes`)
    so the client sees the answer rather than a reset connection.

        responder = LoadingResponder(sock, {"caption": True, "vae": False}).start()
        ...load the models...
        responder.stop()   # the socket keeps listening; new connections queue for uvicorn
    """

    def __init__(self, sock: socket.socket, models: Dict[str, bool], max_body_bytes: int = 2**20):
        self.sock, self.models, self.max_body_bytes = sock, dict(models), max_body_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="stepvideo-loading", daemon=True)

    def start(self) -> "LoadingResponder":
        self.sock.setblocking(False)  # a connection that vanishes between select and accept must not block us
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.1)
            if not ready:
                continue
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                head = self._read_head(conn)
                if head is None:
                    return
                request_line, length = head
                method, _, rest = request_line.partition(" ")
                path = rest.split(" ", 1)[0].split("?", 1)[0]
                if method == "GET" and path == HEALTH_PATH:
                    body = loading_health(self.models)
                else:
                    body = {"status": "loading",
                            "error": "the service is still loading its models; retry when GET /health answers 200"}
                    self._drain(conn, length)
                payload = json.dumps(body).encode()
                conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                             b"retry-after: 2\r\nconnection: close\r\n"
                             + f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
            except OSError:  # the client went away or stalled: nothing to answer
                pass

    @staticmethod
    def _read_head(conn: socket.socket):
        """(request line, Content-Length) of the request, or None if the client sent no complete head."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk or len(data) > 64 * 1024:
                return None
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length" and value.strip().isdigit():
                length = int(value.strip())
        return lines[0], max(length - len(rest), 0)

    def _drain(self, conn: socket.socket, length: int) -> None:
        left = min(length, self.max_body_bytes)
        while left > 0:
            chunk = conn.recv(min(left, 65536))
            if not chunk:
                return
            left -= len(chunk)


def url_for(sock: socket.socket) -> str:
    """The base URL clients should use for a bound socket."""
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()  # listening on every interface: name this machine
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class GracefulServer(uvicorn.Server):
    """On SIGTERM/SIGINT: stop accepting, drop the queued model jobs (their clients get 503), let the
    running job finish for up to the app's grace period, then exit even if it has not (exit code 1;
    0 when everything finished).

    uvicorn itself stops listening and waits `timeout_graceful_shutdown` for open requests;
    `finish` ends the process if the model thread is still busy after that (a device call
    cannot be interrupted, and the interpreter would otherwise wait for it at exit).
    """

    def handle_exit(self, sig, frame) -> None:
        worker = getattr(self.config.app.state, "model_worker", None)
        if worker is not None and not worker.closing:
            dropped = worker.close()
            log.info("signal %s: not accepting requests; dropped %d queued job(s); the running job (%s) has %g s",
                     sig, dropped, worker.running or "none", self.config.timeout_graceful_shutdown or 0)
        super().handle_exit(sig, frame)
        # uvicorn would re-raise the signal once shut down, killing the process before `finish`;
        # the shutdown is handled here, so the process exits normally (0) or from `finish` (1).
        self._captured_signals.clear()

    def finish(self) -> None:
        worker = getattr(self.config.app.state, "model_worker", None)
        if worker is not None and worker.busy:
            log.warning("the grace period of %g s is over and the %s job still runs; exiting without it",
                        self.config.timeout_graceful_shutdown or 0, worker.running)
            logging.shutdown()
            os._exit(1)


def uvicorn_limits(app: FastAPI) -> dict:
    """uvicorn.Config arguments from the app's Limits: connection cap and shutdown grace period."""
    limits: Limits = app.state.limits
    # uvicorn answers 503 once the open connections, the new one included, reach its limit.
    return {"limit_concurrency": limits.max_connections + 1, "timeout_graceful_shutdown": limits.shutdown_grace_s}


def serve(app: FastAPI, sock: socket.socket, on_ready: Callable[[], None], log_level: str = "info") -> None:
    """Serve `app` on the bound `sock` until SIGINT/SIGTERM; `on_ready()` once it accepts connections."""
    class _Server(GracefulServer):
        async def startup(self, sockets: Optional[List[socket.socket]] = None) -> None:
            await super().startup(sockets)
            if self.started:
                on_ready()

    config = uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug", timeout_keep_alive=30,
                            **uvicorn_limits(app))
    server = _Server(config)
    server.run(sockets=[sock])
    server.finish()
