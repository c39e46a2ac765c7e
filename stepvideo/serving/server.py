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

Model work runs on one worker thread, off the event loop (`stepvideo.serving.model_worker`);
bodies are read and answers written by `stepvideo.serving.http_io`; the process around the
app (port held while the models load, graceful stop) is `stepvideo.serving.running`.
"""
from __future__ import annotations

import contextlib
import hmac
import logging
import uuid
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from stepvideo.contracts import check_seed, check_video_shape
from stepvideo.serving import wire
from stepvideo.serving.costs import Estimate, OverBudget, check_budget
from stepvideo.serving.http_io import ApiError, error_response, read_body, require_media_type, tensor_response
from stepvideo.serving.limits import Costs, Limits
from stepvideo.serving.model_worker import ModelWorker, run_for_client

if TYPE_CHECKING:  # the models come in built; importing them here would pull in MindSpore
    from stepvideo.diffusion.interfaces import TextEncoding, VideoDecoding

log = logging.getLogger(__name__)

CAPTION_PATH, VAE_PATH, HEALTH_PATH = wire.CAPTION_PATH, wire.VAE_PATH, wire.HEALTH_PATH
VAE_ENCODE_PATH = wire.VAE_ENCODE_PATH
TOKEN_ENV = wire.TOKEN_ENV

def check_cost(estimate: Estimate, limits: Limits) -> None:
    """Refuse with 413 (naming the estimate and the limit) work that would need more than --max_memory_gb."""
    if limits.max_memory_bytes is None:
        return
    try:
        check_budget(estimate, limits.max_memory_bytes)
    except OverBudget as e:
        raise ApiError(413, str(e)) from None


def _internal_error(context: str) -> ApiError:
    """A 500 that says only "internal error" and a request id; the log pairs the id with the traceback.

    Call from an `except` block. Exception texts can carry internals (MindSpore's C++ call
    stack, paths, shapes of other users' data), so none of it goes to the client.
    """
    request_id = uuid.uuid4().hex[:16]
    log.exception("request %s: %s", request_id, context)
    return ApiError(500, "internal error", headers={"X-Request-Id": request_id}, request_id=request_id)


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
    worker = ModelWorker()
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
        return error_response(exc.status, exc.message, exc.headers, exc.request_id)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        try:
            raise exc
        except Exception:  # noqa: BLE001 - logged with its traceback, answered without it
            error = _internal_error(f"{request.method} {request.url.path} failed")
        return error_response(error.status, error.message, error.headers, error.request_id)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 404:
            message = (f"no endpoint {request.url.path!r}; this service has "
                       f"{', '.join(p for p, on in ((CAPTION_PATH, caption), (VAE_ENCODE_PATH, encoder), (VAE_PATH, vae)) if on)}"
                       f" and {HEALTH_PATH}")
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path} (use POST; GET only for {HEALTH_PATH})"
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

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
            return await run_for_client(worker, request, job, fn, arg, limits.max_waiting)
        except ApiError:
            raise
        except Exception:  # noqa: BLE001 - any model failure becomes a 500; the log has the traceback
            raise _internal_error(f"{failure} {context}") from None

    async def decoded_body(request: Request, model, needs: tuple, media_type: str, decode: Callable):
        """`decode(body)`, after the checks every model endpoint makes first, in order: the model is
        served (404, `needs` = (what, flag)), the token (401), the content type (415), the body's size
        (413) and time (408). A body `decode` refuses (ValueError, WireError included) is a 400."""
        if model is None:
            raise not_served(*needs)
        check_token(request)
        require_media_type(request, media_type)
        body = await read_body(request, limits.max_body_bytes, limits.body_timeout_s)
        try:
            return decode(body)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def check_array(name: str, array: np.ndarray, estimate: Optional[Callable[[tuple], Estimate]]) -> None:
        """413 if the work on `array` would need more memory than allowed; 400 if it holds NaN or inf."""
        if estimate is not None:
            check_cost(estimate(array.shape), limits)
        if not np.isfinite(array).all():
            raise ApiError(400, f"{name} contain NaN or infinite values")

    def decode_samples(body) -> np.ndarray:
        return wire.decode(body, [limits.samples_spec(vae_channels)], max_elements=limits.max_latent_elements,
                           source="request body")["samples"]

    def decode_videos_and_seed(body) -> tuple:
        got = wire.decode(body, [limits.videos_spec(), wire.TensorSpec("seed", ("n",), ("I64",), sizes=(1,))],
                          max_elements=limits.max_video_elements + 1, source="request body")
        check_video_shape(got["videos"].shape, what="videos")
        return got["videos"], check_seed(int(got["seed"][0]))

    @app.post(CAPTION_PATH)
    async def caption_api(request: Request):
        prompts = await decoded_body(request, caption, ("caption model", "--enable_llm"), wire.JSON_MEDIA_TYPE,
                                     lambda body: wire.decode_prompts(body, max_prompts=limits.max_prompts,
                                                                      max_prompt_chars=limits.max_prompt_chars))
        if costs.caption is not None:
            check_cost(costs.caption.encode(len(prompts)), limits)
        out = await run_model(request, "caption", caption.encode, prompts, "caption model failed",
                              f"on {len(prompts)} prompt(s)")
        return tensor_response(out.as_dict())

    @app.post(VAE_PATH)
    async def vae_api(request: Request):
        samples = await decoded_body(request, vae, ("VAE", "--enable_vae"), wire.MEDIA_TYPE, decode_samples)
        check_array("samples", samples, costs.vae.decode if costs.vae else None)
        video = await run_model(request, "vae", vae.decode, samples, "VAE decode failed",
                                f"on samples of shape {samples.shape}")
        return tensor_response({"video": video})

    @app.post(VAE_ENCODE_PATH)
    async def vae_encode_api(request: Request):
        """TI2V: encode videos (a first image is one frame) to latents, noise drawn from the given seed."""
        videos, seed = await decoded_body(request, encoder, ("VAE encoder", "--enable_vae"), wire.MEDIA_TYPE,
                                          decode_videos_and_seed)
        check_array("videos", videos, costs.vae.encode if costs.vae else None)
        latents = await run_model(request, "vae-encode", lambda x: encoder.encode(x, seed=seed), videos,
                                  "VAE encode failed", f"on videos of shape {videos.shape}")
        return tensor_response({"latents": latents})

    return app
