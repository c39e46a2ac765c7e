"""The caption and VAE services as one FastAPI app, built from already-loaded models.

    app = create_app(caption=LocalCaption(...), vae=LocalVae(...), token="secret")

Endpoints (each model is optional; a process may serve either or both):

    POST /caption-api   JSON {"prompts": [...]}            -> safetensors: y, y_mask, clip_embedding
    POST /vae-api       safetensors: samples (b,T,64,h,w)  -> safetensors: video (b,frames,3,16h,16w)
    POST /vae-encode-api  safetensors: videos (b,frames,3,H,W), seed (1,) int64
                                                           -> safetensors: latents (b,T,64,H/16,W/16)
    GET  /health        JSON: models loaded, device, dtype, busy

The original services unpickled request bodies and answered every failure
with HTTP 200 and a `None`; here bad input gets a 4xx and a model failure a
5xx, both with a JSON body {"error": "..."} that says what was wrong, and the
service keeps serving. Checks, in order: token (if one is set), content type,
declared and streamed body size (before the body is read past the limit),
the payload itself (`stepvideo.serving.wire`), then room in the queue for the
model (503 when `max_waiting` requests already wait).

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
import select
import socket
import threading
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
    """What a request may ask for. The defaults fit a 204-frame 544x992 video with margin."""

    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20)
    max_prompts: int = 64
    max_prompt_chars: int = 16384
    max_batch: int = 16
    max_latent_frames: int = 1024  # T; 3 latents decode to 17 frames
    max_latent_side: int = 512  # h and w; 16 pixels each
    max_latent_elements: int = 16 * 2**20  # b*T*64*h*w; the video has ~68x as many values
    max_waiting: int = 32  # requests queued for the model; more get 503 (each holds its body in memory)
    # VAE encode (TI2V's first image; one frame is the usual request). Its cost grows with
    # b*frames*H*W like a decode's with its output; this bound is what a 64 MiB body holds in bf16.
    max_video_frames: int = 17 * 64
    max_video_side: int = 16 * 512  # H and W, as max_latent_side in pixels
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


class ApiError(Exception):
    """An HTTP error answered as {"error": message}."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class _ModelWorker:
    """Runs model calls one at a time on a single thread and reports what it is doing."""

    def __init__(self):
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stepvideo-model")
        self._lock = threading.Lock()
        self.running: Optional[str] = None
        self.waiting = 0
        self.served: Dict[str, int] = {}
        self.failed: Dict[str, int] = {}

    async def run(self, what: str, fn: Callable, *args, max_waiting: int):
        with self._lock:
            if self.waiting >= max_waiting:
                raise ApiError(503, f"{self.waiting} requests are already waiting for the model; try again later",
                               headers={"Retry-After": "5"})
            self.waiting += 1

        def job():
            with self._lock:
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

        return await asyncio.wrap_future(self._executor.submit(job))

    def status(self) -> dict:
        with self._lock:
            return {"busy": self.running is not None or self.waiting > 0, "running": self.running,
                    "waiting": self.waiting, "served": dict(self.served), "failed": dict(self.failed)}

    def shutdown(self) -> None:
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


async def _read_body(request: Request, limit: int) -> bytearray:
    """The body, refused with 413 as soon as its declared or received size passes `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length must be a non-negative integer, got {declared!r}")
        if int(declared) > limit:
            raise ApiError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes "
                                "(server option --max_body_mb)")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes (server option --max_body_mb)")
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


def _error(status: int, message: str, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(caption: Optional[TextEncoding] = None, vae: Optional[VideoDecoding] = None, *,
               token: Optional[str] = None, limits: Limits = Limits(), device: str = "CPU",
               dtype: str = "float32", vae_channels: int = 64) -> FastAPI:
    """The services for the given models (at least one). `token`: require "Authorization: Bearer <token>"."""
    if caption is None and vae is None:
        raise ValueError("create_app needs a caption model, a VAE, or both")
    expected_auth = f"Bearer {wire.check_token(token)}".encode("ascii") if token is not None else None
    # The VAE also encodes (TI2V's first image) when it has `encode(video, seed)`, as LocalVae does.
    encoder = vae if callable(getattr(vae, "encode", None)) else None
    worker = _ModelWorker()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        worker.shutdown()

    app = FastAPI(title="Step-Video caption / VAE services", docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return _error(exc.status, exc.message, exc.headers)

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

    async def run_model(job: str, fn, arg, failure: str, context: str):
        """fn(arg) on the model worker; a model exception becomes a 500 naming `failure`."""
        try:
            return await worker.run(job, fn, arg, max_waiting=limits.max_waiting)
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - any model failure becomes a 500 with its message
            log.exception("%s %s", failure, context)
            raise ApiError(500, f"{failure}: {type(e).__name__}: {e}") from None

    @app.post(CAPTION_PATH)
    async def caption_api(request: Request):
        if caption is None:
            raise not_served("caption model", "--enable_llm")
        check_token(request)
        _require_media_type(request, wire.JSON_MEDIA_TYPE)
        body = await _read_body(request, limits.max_body_bytes)
        try:
            prompts = wire.decode_prompts(body, max_prompts=limits.max_prompts,
                                          max_prompt_chars=limits.max_prompt_chars)
        except wire.WireError as e:
            raise ApiError(400, str(e)) from None
        out = await run_model("caption", caption.encode, prompts, "caption model failed",
                              f"on {len(prompts)} prompt(s)")
        return _tensor_response(out.as_dict())

    @app.post(VAE_PATH)
    async def vae_api(request: Request):
        if vae is None:
            raise not_served("VAE", "--enable_vae")
        check_token(request)
        _require_media_type(request, wire.MEDIA_TYPE)
        body = await _read_body(request, limits.max_body_bytes)
        try:
            samples = wire.decode(body, [limits.samples_spec(vae_channels)],
                                  max_elements=limits.max_latent_elements, source="request body")["samples"]
        except wire.WireError as e:
            raise ApiError(400, str(e)) from None
        if not np.isfinite(samples).all():
            raise ApiError(400, "samples contain NaN or infinite values")
        video = await run_model("vae", vae.decode, samples, "VAE decode failed",
                                f"on samples of shape {samples.shape}")
        return _tensor_response({"video": video})

    @app.post(VAE_ENCODE_PATH)
    async def vae_encode_api(request: Request):
        """TI2V: encode videos (a first image is one frame) to latents, noise drawn from the given seed."""
        if encoder is None:
            raise not_served("VAE encoder", "--enable_vae")
        check_token(request)
        _require_media_type(request, wire.MEDIA_TYPE)
        body = await _read_body(request, limits.max_body_bytes)
        try:
            got = wire.decode(body, [limits.videos_spec(), wire.TensorSpec("seed", ("n",), ("I64",), sizes=(1,))],
                              max_elements=limits.max_video_elements + 1, source="request body")
            check_video_shape(got["videos"].shape, what="videos")
            seed = check_seed(int(got["seed"][0]))
        except ValueError as e:  # a WireError is a ValueError too
            raise ApiError(400, str(e)) from None
        videos = got["videos"]
        if not np.isfinite(videos).all():
            raise ApiError(400, "videos contain NaN or infinite values")
        latents = await run_model("vae-encode", lambda x: encoder.encode(x, seed=seed), videos, "VAE encode failed",
                                  f"on videos of shape {videos.shape}")
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


def serve(app: FastAPI, sock: socket.socket, on_ready: Callable[[], None], log_level: str = "info") -> None:
    """Serve `app` on the bound `sock` until SIGINT/SIGTERM; `on_ready()` once it accepts connections."""
    class _Server(uvicorn.Server):
        async def startup(self, sockets: Optional[List[socket.socket]] = None) -> None:
            await super().startup(sockets)
            if self.started:
                on_ready()

    config = uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug", timeout_keep_alive=30)
    _Server(config).run(sockets=[sock])
