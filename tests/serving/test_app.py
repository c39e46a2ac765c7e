"""The app factory in-process, with stand-in models: what the real-process tests cannot provoke.

A real model does not fail on valid input, so a failing stand-in shows that a model
failure is a 500 with its message and that the service goes on serving.
"""
import logging
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from stepvideo.serving import wire
from stepvideo.diffusion.interfaces import CaptionOutput, TextEncoding, VideoDecoding
from stepvideo.serving.server import create_app


class EchoCaption(TextEncoding):
    """y row i is filled with len(prompt i); records the thread it ran on."""

    def __init__(self):
        self.threads = set()

    def encode(self, prompts):
        self.threads.add(threading.current_thread().name)
        b = len(prompts)
        y = np.stack([np.full((4, 3), len(p), np.float32) for p in prompts])
        return CaptionOutput(y=y, y_mask=np.ones((b, 6), np.int64), clip_embedding=np.zeros((b, 2, 5), np.float32))


class BrokenVae(VideoDecoding):
    def decode(self, latents):
        raise RuntimeError("out of device memory (stand-in)")


@pytest.fixture
def client():
    caption = EchoCaption()
    with TestClient(create_app(caption, BrokenVae(), token="s3cret", device="CPU", dtype="float32")) as c:
        c.headers["authorization"] = "Bearer s3cret"
        c.caption = caption
        yield c


def post_prompts(client, prompts):
    return client.post("/caption-api", content=wire.encode_prompts(prompts),
                       headers={"content-type": "application/json"})


def test_model_failure_is_a_500_internal_error_with_a_request_id_and_the_service_keeps_serving(client, caplog):
    z = wire.encode({"samples": np.zeros((1, 3, 64, 2, 2), np.float32)})
    with caplog.at_level(logging.ERROR, logger="stepvideo.serving.server"):
        r = client.post("/vae-api", content=z, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 500
    request_id = r.json()["request_id"]
    assert r.json() == {"error": "internal error", "request_id": request_id} and len(request_id) == 16
    assert r.headers["x-request-id"] == request_id
    assert "out of device memory" not in r.text
    # The log pairs the id with the full traceback.
    (record,) = [rec for rec in caplog.records if request_id in rec.getMessage()]
    assert record.getMessage() == f"request {request_id}: VAE decode failed on samples of shape (1, 3, 64, 2, 2)"
    assert "RuntimeError: out of device memory (stand-in)" in caplog.text and "Traceback" in caplog.text
    r = post_prompts(client, ["ab", "", "xyz"])
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    out = wire.decode(r.content, [wire.TensorSpec("y", ("b", "l", "c"), ("F32", "BF16")),
                                  wire.TensorSpec("y_mask", ("b", "l"), ("I64",)),
                                  wire.TensorSpec("clip_embedding", ("b", "l", "c"), ("F32", "BF16"), min_size=0)])
    assert out["y"][:, 0, 0].tolist() == [2, 0, 3]
    health = client.get("/health").json()
    assert health["served"] == {"caption": 1} and health["failed"] == {"vae": 1} and not health["busy"]
    # The model ran on the worker thread, not on the event loop.
    assert client.caption.threads == {"stepvideo-model_0"}


def test_health_and_missing_models():
    with TestClient(create_app(vae=BrokenVae(), device="Ascend", dtype="bfloat16")) as c:
        health = c.get("/health").json()
        assert health["models"] == {"caption": False, "vae": True}
        assert (health["device"], health["dtype"], health["busy"], health["running"]) == ("Ascend", "bfloat16",
                                                                                           False, None)
        r = post_prompts(c, ["a"])
        assert r.status_code == 404
        assert r.json()["error"] == "this service does not run the caption model (start it with --enable_llm True)"
        r = c.get("/nope")
        assert r.status_code == 404 and "/vae-api and /health" in r.json()["error"]
    with pytest.raises(ValueError, match="needs a caption model, a VAE, or both"):
        create_app()


class BigVae(VideoDecoding):
    """A video larger than the one-piece response limit, so the answer is streamed in chunks."""

    def decode(self, latents):
        b, t, _, h, w = latents.shape
        rng = np.random.default_rng(int(latents.sum() * 1000) % 2**32)
        return rng.standard_normal((b, 8 * t - 7, 3, 16 * h, 16 * w)).astype(np.float32)


def test_large_answers_are_streamed_exactly():
    z = np.full((1, 3, 64, 8, 12), 0.5, np.float32)  # -> (1, 17, 3, 128, 192): 5 MB per 3 latents
    z = np.concatenate([z, z], 1)  # 34 frames, 10 MB: above the one-piece limit
    with TestClient(create_app(vae=BigVae())) as c:
        r = c.post("/vae-api", content=wire.encode({"samples": z}), headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content) > 8 * 2**20
        video = wire.decode(r.content, [wire.TensorSpec("video", ("b", "f", "c", "h", "w"), ("F32",))])["video"]
    assert video.tobytes() == BigVae().decode(z).tobytes()


class SlowVae(VideoDecoding):
    def __init__(self):
        self.release = threading.Event()

    def decode(self, latents):
        self.release.wait(10)
        b, t, _, h, w = latents.shape
        return np.zeros((b, 8 * t - 7, 3, 16 * h, 16 * w), np.float32)


def test_too_many_waiting_requests_get_503_and_health_stays_responsive():
    from stepvideo.serving.server import Limits

    vae = SlowVae()
    body = wire.encode({"samples": np.zeros((1, 1, 64, 1, 1), np.float32)})
    with TestClient(create_app(vae=vae, limits=Limits(max_waiting=1))) as c:
        post = lambda: c.post("/vae-api", content=body, headers={"content-type": "application/octet-stream"})
        results = []
        first = threading.Thread(target=lambda: results.append(post().status_code))
        first.start()
        while not c.get("/health").json()["running"]:  # the first one occupies the model
            pass
        second = threading.Thread(target=lambda: results.append(post().status_code))
        second.start()
        while c.get("/health").json()["waiting"] < 1:  # the second one waits
            pass
        r = post()  # the third finds the queue full
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"] == "1 requests are already waiting for the model; try again later"
        vae.release.set()
        first.join()
        second.join()
    assert results == [200, 200]
