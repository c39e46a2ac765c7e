"""Hostile use of the real services: costly requests, slow bodies, too many connections, clients
that leave, SIGTERM while busy. Real processes on loopback with the tiny models.

- `limited`: both models, --max_memory_gb 0.3, --body_timeout 2, --max_connections 6;
- `graceful`: VAE only, --shutdown_grace 60, stopped with SIGTERM while a job runs and one waits;
- `impatient`: VAE only, --shutdown_grace 1, stopped with SIGTERM during a longer job.
"""
from __future__ import annotations

import signal
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from conftest import read_status
from stepvideo.serving import wire
from stepvideo.serving.client import RemoteCaption, RemoteVae, ServiceError

pytestmark = pytest.mark.slow

LONG = (1, 3, 64, 4, 8)  # a few seconds on the tiny VAE
SMALL = (1, 1, 64, 1, 2)


def latents(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def host_port(url: str):
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    return host, int(port)


def raw_request(url: str, body: bytes, declared: int = None, path: str = "/vae-api",
                content_type: str = wire.MEDIA_TYPE) -> socket.socket:
    """A connection that has sent the headers and `body` (which may be shorter than `declared`)."""
    host, port = host_port(url)
    s = socket.create_connection((host, port), timeout=30)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if declared is None else declared}\r\n\r\n").encode()
    s.sendall(head + body)
    return s


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def limited(start_service, tiny_model_dir):
    proc = start_service(["--model_dir", str(tiny_model_dir), "--port", "0", "--max_memory_gb", "0.3",
                          "--body_timeout", "2", "--max_connections", "6"])
    return proc, proc.wait_ready()["vae_url"]


def test_costly_requests_are_refused_before_they_run(limited):
    _, url = limited
    served = health(url)["served"]
    with RemoteVae(url) as vae, RemoteCaption(url) as caption:
        started = time.perf_counter()
        with pytest.raises(ServiceError) as e:
            vae.decode(latents((1, 3, 64, 16, 16)))  # ~1.7 GB on CPU with the tiny VAE
        seconds = time.perf_counter() - started
        assert e.value.status == 413
        assert e.value.message.startswith("decoding latents of shape (1, 3, 64, 16, 16) needs about 1.")
        assert "more than this service's limit of 0.30 GB (server option --max_memory_gb)" in e.value.message
        with pytest.raises(ServiceError) as e:
            caption.encode(["a cat"] * 64)
        assert e.value.status == 413 and e.value.message.startswith("encoding 64 prompt(s) needs about 0.5")
        assert caption.encode(["a cat"]).y.shape[0] == 1  # a cheap request still runs
        assert vae.decode(latents(SMALL)).shape == (1, 1, 3, 16, 32)
    print(f"\n413 for (1, 3, 64, 16, 16) after {seconds * 1000:.0f} ms")
    assert seconds < 2.0
    after = health(url)["served"]
    assert after.get("vae", 0) == served.get("vae", 0) + 1 and after.get("caption", 0) == served.get("caption", 0) + 1


def test_a_slow_body_gets_408_at_the_body_timeout(limited):
    _, url = limited
    started = time.monotonic()
    s = raw_request(url, b"\0" * 1024, declared=2**20)
    status = read_status(s)
    seconds = time.monotonic() - started
    s.close()
    print(f"\nslow body: {status} after {seconds:.2f} s")
    assert status == 408 and 1.9 <= seconds < 6


def test_connections_over_the_cap_get_503_and_the_cap_frees_up(limited):
    _, url = limited
    held = [raw_request(url, b"\0" * 1024, declared=2**20) for _ in range(6)]  # six slow uploads
    time.sleep(0.3)
    started = time.monotonic()
    with httpx.Client(timeout=10) as http:
        r = http.get(url + "/health")
        assert r.status_code == 503, r.text  # the seventh connection
        print(f"\n7th connection: {r.status_code} after {(time.monotonic() - started) * 1000:.0f} ms")
        statuses = [read_status(s) for s in held]  # each cut at the 2 s body timeout
        for s in held:
            s.close()
        assert statuses == [408] * 6
        assert wait_for(lambda: http.get(url + "/health").status_code == 200, 10, "/health 200")


def test_a_queued_job_whose_client_left_is_dropped(limited):
    _, url = limited
    before = health(url)
    result = {}

    def long_decode():
        with RemoteVae(url) as vae:
            result["video"] = vae.decode(latents(LONG, seed=1))

    first = threading.Thread(target=long_decode)
    first.start()
    wait_for(lambda: health(url)["running"] == "vae", what="the long decode to run")
    gone = raw_request(url, wire.encode({"samples": latents(SMALL, seed=2)}))
    wait_for(lambda: health(url)["waiting"] == 1, what="the second request to queue")
    gone.close()
    status = wait_for(lambda: (lambda h: h if h["dropped"] == before["dropped"] + 1 else None)(health(url)), 10,
                      "the queued job to be dropped")
    assert status["running"] == "vae" and status["waiting"] == 0  # dropped while the first still runs
    first.join()
    time.sleep(0.5)
    after = health(url)
    assert result["video"].shape == (1, 17, 3, 64, 128)
    assert after["served"]["vae"] == before["served"].get("vae", 0) + 1  # only the first one ran
    assert not after["busy"]


def _busy_service(start_service, tiny_model_dir, grace: str):
    proc = start_service(["--model_dir", str(tiny_model_dir), "--enable_llm", "False", "--port", "0",
                          "--shutdown_grace", grace])
    return proc, proc.wait_ready()["vae_url"]


def test_sigterm_finishes_the_running_job_drops_the_queue_and_exits(start_service, tiny_model_dir):
    proc, url = _busy_service(start_service, tiny_model_dir, "60")
    results = {}

    def call(name, shape):
        try:
            with RemoteVae(url, connect_wait=0) as vae:
                results[name] = vae.decode(latents(shape))
        except ServiceError as e:
            results[name] = e

    running = threading.Thread(target=call, args=("running", LONG))
    running.start()
    wait_for(lambda: health(url)["running"] == "vae", what="the decode to run")
    queued = threading.Thread(target=call, args=("queued", SMALL))
    queued.start()
    wait_for(lambda: health(url)["waiting"] == 1, what="the second request to queue")
    signalled = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    queued.join(10)
    assert isinstance(results["queued"], ServiceError) and results["queued"].status == 503
    assert "shutting down" in results["queued"].message
    running.join(60)
    assert isinstance(results["running"], np.ndarray) and results["running"].shape == (1, 17, 3, 64, 128)
    code = proc.proc.wait(30)
    seconds = time.monotonic() - signalled
    print(f"\nSIGTERM with a running and a queued job: exit {code} after {seconds:.1f} s")
    assert code == 0 and seconds < 60
    assert "dropped 1 queued job(s)" in proc.log()


def test_sigterm_exits_within_the_grace_period_even_if_the_job_runs_on(start_service, tiny_model_dir):
    proc, url = _busy_service(start_service, tiny_model_dir, "1")
    results = {}

    def call():
        try:
            with RemoteVae(url, connect_wait=0) as vae:
                results["running"] = vae.decode(latents(LONG))
        except ServiceError as e:
            results["running"] = e

    running = threading.Thread(target=call)
    running.start()
    wait_for(lambda: health(url)["running"] == "vae", what="the decode to run")
    signalled = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    code = proc.proc.wait(30)
    seconds = time.monotonic() - signalled
    running.join(30)
    print(f"\nSIGTERM, grace 1 s, job still running: exit {code} after {seconds:.1f} s")
    assert code == 1 and seconds < 4
    assert "the grace period of 1 s is over and the vae job still runs; exiting without it" in proc.log()
    assert isinstance(results["running"], ServiceError)


def test_unpadded_safetensors_bodies_decode_like_padded_ones(limited):
    """The format allows any header length: data at offsets 1..7 past alignment gives the same video."""
    import struct

    _, url = limited
    good = wire.encode({"samples": latents(SMALL, seed=4)})
    (n,) = struct.unpack_from("<Q", good)
    with httpx.Client(timeout=60) as http:
        want = http.post(url + "/vae-api", content=good, headers={"content-type": wire.MEDIA_TYPE})
        assert want.status_code == 200
        for extra in range(1, 8):
            raw = good[8:8 + n].rstrip(b" ") + b" " * extra
            body = struct.pack("<Q", len(raw)) + raw + good[8 + n:]
            r = http.post(url + "/vae-api", content=body, headers={"content-type": wire.MEDIA_TYPE})
            assert r.status_code == 200 and r.content == want.content, (extra, r.status_code, r.text[:200])
