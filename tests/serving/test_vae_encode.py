"""The VAE service's encode endpoint (TI2V's first image) in a real service process, tiny VAE.

The remote encode must equal the in-process `LocalVae.encode` bit for bit (one image and a 17-frame
video, several seeds), and bad requests get a 4xx naming the problem while the service keeps serving.
"""
import json
import struct

import httpx
import numpy as np
import pytest

from stepvideo.serving import wire
from stepvideo.serving.client import RemoteVae, ServiceError
from stepvideo.diffusion.interfaces import LocalVae

TOKEN = "encode-secret"
OCTET = {"content-type": "application/octet-stream", "authorization": f"Bearer {TOKEN}"}


def video(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.fixture(scope="module")
def vae_service(start_service, tiny_model_dir):
    proc = start_service(["--model_dir", str(tiny_model_dir), "--enable_llm", "False", "--enable_vae", "True",
                          "--port", "0", "--token", TOKEN, "--max_body_mb", "1"])
    return proc, proc.wait_ready()["vae_url"]


@pytest.fixture(scope="module")
def local_vae(tiny_model_dir):
    return LocalVae.from_model_dir(tiny_model_dir)


def test_remote_encode_equals_local_bit_for_bit(vae_service, local_vae):
    _, url = vae_service
    with RemoteVae(url, token=TOKEN) as remote:
        assert remote.encode_url == url + "/vae-encode-api"
        for shape, seed in (((1, 1, 3, 32, 48), 0), ((1, 1, 3, 32, 48), 5), ((2, 17, 3, 16, 16), 3)):
            x = video(shape, seed)
            got, want = remote.encode(x, seed=seed), local_vae.encode(x, seed=seed)
            assert got.dtype == np.float32 and got.shape == want.shape
            assert got.tobytes() == want.tobytes(), (shape, seed)
        one = remote.encode(video((1, 1, 3, 32, 48)), seed=0)
        assert one.shape == (1, 1, 64, 2, 3)  # an image is one latent frame
        assert remote.encode(video((1, 1, 3, 32, 48)), seed=1).tobytes() != one.tobytes()  # the seed is used
        health = remote.health()
    assert health["served"].get("vae-encode", 0) >= 5 and not health["failed"]


def _encode_body(videos, seed=np.array([0], np.int64)):
    tensors = {"videos": videos}
    if seed is not None:
        tensors["seed"] = seed
    return wire.encode(tensors)


def _declared_only(shape):
    """A body whose header declares `videos` of `shape` (with a seed) but carries only 512 bytes of data."""
    header = {"seed": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
              "videos": {"dtype": "F32", "shape": list(shape), "data_offsets": [8, 8 + 4 * int(np.prod(shape))]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 512


@pytest.mark.parametrize("label, body, status, message", [
    ("5 frames", _encode_body(video((1, 5, 3, 16, 16))), 400, "last chunk of 5 frames"),
    ("side not x16", _encode_body(video((1, 1, 3, 24, 16))), 400, "multiples of 16, got 24 x 16"),
    ("4 channels", _encode_body(video((1, 1, 4, 16, 16))), 400, "axis c has size 4, expected 3"),
    ("NaN", _encode_body(np.full((1, 1, 3, 16, 16), np.nan, np.float32)), 400, "NaN or infinite"),
    ("no seed", _encode_body(video((1, 1, 3, 16, 16)), seed=None), 400, "missing ['seed']"),
    ("negative seed", _encode_body(video((1, 1, 3, 16, 16)), seed=np.array([-1], np.int64)), 400,
     "seed must be an integer in [0, 2**63), got -1"),
    ("too many frames", _declared_only((1, 17 * 18 + 1, 3, 16, 16)), 400, "larger than the limit 306"),
    ("too wide", _declared_only((1, 1, 3, 16, 16 * 65)), 400, "larger than the limit 1024"),
    ("too many values", _declared_only((4, 306, 3, 1024, 1024)), 400, "elements in all, larger than the limit"),
    ("body over 1 MiB", _encode_body(video((1, 17, 3, 128, 128))), 413, "exceeds the limit"),
])
def test_bad_encode_requests_get_4xx(vae_service, local_vae, label, body, status, message):
    _, url = vae_service
    r = httpx.post(url + "/vae-encode-api", content=body, headers=OCTET, timeout=60)
    assert r.status_code == status, (label, r.text)
    assert message in r.json()["error"], (label, r.json())
    with RemoteVae(url, token=TOKEN) as remote:  # still serving, still right
        x = video((1, 1, 3, 16, 16))
        assert remote.encode(x, seed=2).tobytes() == local_vae.encode(x, seed=2).tobytes()


def test_encode_needs_the_token_and_the_client_checks_first(vae_service):
    _, url = vae_service
    with RemoteVae(url, token="wrong") as remote, pytest.raises(ServiceError, match="HTTP 401"):
        remote.encode(video((1, 1, 3, 16, 16)))
    with RemoteVae(url, token=TOKEN) as remote, pytest.raises(ValueError, match="multiples of 16"):
        remote.encode(video((1, 1, 3, 20, 16)))
