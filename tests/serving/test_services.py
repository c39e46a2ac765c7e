"""The services as real processes on loopback, with real (tiny) models.

One process serves both models with a token and a 1 MiB body limit (so oversized bodies
are cheap to send); a second serves only the VAE on IPv6 loopback without a token and is
called while it is still loading. Remote results are compared with the same models run
in this process, bit for bit, and the caption answers with the golden fixtures.
"""
from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import logging
import os
import pickle
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from conftest import SERVER, free_port, ipv6_loopback, read_status
from stepvideo.serving import wire
from stepvideo.serving.client import RemoteCaption, RemoteVae, ServiceError
from stepvideo.diffusion.interfaces import LocalCaption, LocalVae
from support import assert_parity, cases, load

TOKEN = "serving-tests-token-7f3a"
AUTH = {"authorization": f"Bearer {TOKEN}"}
BODY_LIMIT = 2**20
OCTET = {"content-type": "application/octet-stream"}
JSON_CT = {"content-type": "application/json"}
PROMPT_SETS = [["A cat walks on the grass, realistic style.", ""],
               ["一名宇航员在月球上发现一块石碑，上面印有“stepfun”字样，闪闪发光"],
               ["Hello 世界 123 🙂 café", "   ", "画面暗、低分辨率、不良手、文本。"]]
LATENT_SHAPES = [(1, 3, 64, 2, 3), (2, 4, 64, 2, 2), (1, 1, 64, 1, 1)]


def latents(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def same_caption(a, b) -> bool:
    return all(same_bits(x, y) for x, y in zip(
        (a.y, a.y_mask, a.clip_embedding), (b.y, b.y_mask, b.clip_embedding)))


@pytest.fixture(scope="module")
def local_caption(tiny_model_dir):
    return LocalCaption.from_model_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def local_vae(tiny_model_dir):
    return LocalVae.from_model_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def both(start_service, tiny_model_dir):
    """(process, base URL) of a service with both models, a token and a 1 MiB body limit."""
    proc = start_service(["--model_dir", str(tiny_model_dir), "--enable_llm", "True", "--enable_vae", "True",
                          "--port", "0", "--token", TOKEN, "--max_body_mb", str(BODY_LIMIT / 2**20)])
    urls = proc.wait_ready()
    assert urls["caption_url"] == urls["vae_url"]  # one process, one port
    return proc, urls["caption_url"]


@pytest.fixture(scope="module")
def references(local_caption, local_vae):
    """What the models give in this process, for every prompt set and latent shape used below."""
    return ({i: local_caption.encode(p) for i, p in enumerate(PROMPT_SETS)},
            {s: local_vae.decode(latents(s)) for s in LATENT_SHAPES})


def test_remote_equals_local_bit_for_bit(both, references):
    _, url = both
    captions, videos = references
    with RemoteCaption(url, token=TOKEN) as caption, RemoteVae(url, token=TOKEN) as vae:
        for i, prompts in enumerate(PROMPT_SETS):
            assert same_caption(caption.encode(prompts), captions[i]), prompts
        for shape in LATENT_SHAPES:
            video = vae.decode(latents(shape))
            assert video.shape == (shape[0], 8 * shape[1] - 7 * ((shape[1] + 2) // 3), 3, 16 * shape[3], 16 * shape[4])
            assert same_bits(video, videos[shape]), shape


def test_caption_service_gives_the_golden_numbers(both):
    """Through HTTP, the packed answer matches the original's Step-LLM and CLIP outputs."""
    _, url = both
    llm, clip = load("step_llm", "outputs"), load("clip", "outputs")
    with RemoteCaption(url, token=TOKEN) as caption:
        for batch, prompts in cases("step_llm")["encoder_batches"].items():
            out = caption.encode(prompts)
            assert_parity(out.y, llm[f"{batch}.y"], f"remote {batch}.y")
            assert_parity(out.clip_embedding, clip[f"{batch}.last_hidden_state"], f"remote {batch}.clip_embedding")
            want_mask = np.concatenate([np.ones((len(prompts), 77), np.int64), llm[f"{batch}.y_mask"]], 1)
            np.testing.assert_array_equal(out.y_mask, want_mask)


def test_pipeline_setup_api_uses_the_services(both, local_caption, local_vae, tmp_path):
    """The pipeline's own encode_prompt / decode_vae through setup_api give the in-process numbers."""
    from types import SimpleNamespace

    import mindspore as ms

    from stepvideo.diffusion.video_pipeline import StepVideoPipeline

    _, url = both
    transformer = SimpleNamespace(dtype=ms.float32)  # encode_prompt only reads the DiT's dtype
    remote = StepVideoPipeline(transformer, scheduler=None, save_path=str(tmp_path)).setup_api(
        vae_url=url, caption_url=url, token=TOKEN, connect_wait=10)
    local = StepVideoPipeline(transformer, scheduler=None, save_path=str(tmp_path),
                              text_encoding=local_caption, video_decoding=local_vae)
    for got, want in zip(remote.encode_prompt(["a cat", "一只熊猫"], neg_magic="bad", pos_magic=" HDR"),
                         local.encode_prompt(["a cat", "一只熊猫"], neg_magic="bad", pos_magic=" HDR")):
        assert same_bits(got.asnumpy(), want.asnumpy())
    z = latents((1, 3, 64, 1, 2), seed=11)
    assert same_bits(remote.decode_vae(z), local.decode_vae(z))


# --------------------------------------------------------------------------- malformed requests


class _Evil:
    """Unpickling this runs a shell command: the original services would have executed it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def raw_status(host: str, port: int, data: bytes) -> int:
    """Send raw bytes, return the status code of the answer (for what httpx refuses to send)."""
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(data)
        return read_status(s)


def malformed_requests(marker: str):
    """(category, label, method, path, headers, body) of requests that must all get a 4xx."""
    good_z = latents((1, 1, 64, 1, 2))
    good = wire.encode({"samples": good_z})
    good_header_len = 8 + struct.unpack_from("<Q", good)[0]

    def payload(header: dict, data: bytes) -> bytes:
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + data

    def samples(shape, dtype="F32", data=None, offsets=None, name="samples"):
        size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}[dtype]
        if data is None:
            n = 1
            for d in shape:
                n *= d
            data = b"\0" * size * n
        return payload({name: {"dtype": dtype, "shape": shape, "data_offsets": offsets or [0, len(data)]}}, data)

    out = []

    def vae(category, label, body, headers=None, method="POST"):
        out.append((category, label, method, "/vae-api", {**AUTH, **OCTET, **(headers or {})}, body))

    def cap(category, label, body, headers=None, method="POST"):
        out.append((category, label, method, "/caption-api", {**AUTH, **JSON_CT, **(headers or {})}, body))

    # Empty bodies.
    vae("empty body", "vae", b"")
    cap("empty body", "caption", b"")
    # Truncated safetensors payloads: every cut of a valid one.
    for cut in sorted({*range(1, 9), *range(9, good_header_len, max(1, good_header_len // 25)),
                       *range(good_header_len, len(good), max(1, (len(good) - good_header_len) // 25))}):
        vae("truncated body", f"cut at {cut}/{len(good)}", good[:cut])
    # Wrong dtypes.
    for dtype in ("I64", "I32", "U8", "BOOL", "F64"):
        vae("wrong dtype", dtype, samples([1, 1, 64, 1, 2], dtype))
    vae("wrong dtype", "unknown Q8", samples([1, 1, 64, 1, 2], "F32").replace(b'"F32"', b'"Q8_"'))
    # Wrong rank / channel count / name.
    for shape in ([1, 64, 1, 2], [64], [1, 1, 1, 64, 1, 2], []):
        vae("wrong rank", str(shape), samples(shape))
    for c in (1, 16, 63, 65, 128):
        vae("wrong channels", str(c), samples([1, 1, c, 1, 2]))
    for name in ("latents", "sample", "Samples", ""):
        vae("wrong tensor name", repr(name), samples([1, 1, 64, 1, 2], name=name))
    vae("wrong tensor name", "extra tensor",
        payload({"samples": {"dtype": "F32", "shape": [1, 1, 64, 1, 2], "data_offsets": [0, 512]},
                 "extra": {"dtype": "F32", "shape": [1], "data_offsets": [512, 516]}}, b"\0" * 516))
    # Huge shapes (per-dimension and total limits) and negative / non-integer shapes.
    for shape in ([17, 1, 64, 1, 1], [1, 1025, 64, 1, 1], [1, 1, 64, 513, 1], [1, 1, 64, 1, 513],
                  [1, 1, 64, 10**6, 10**6], [1, 1, 64, 2**31, 1], [1, 1, 64, 2**63, 2**63], [2**64, 1, 64, 1, 1],
                  [1, 1, 64, 10**30, 1], [16, 1024, 64, 512, 512], [16, 16, 64, 128, 128]):
        vae("huge shape", str(shape)[:40], samples(shape, data=b"\0" * 512))
    for shape in ([1, -1, 64, 1, 2], [-1, 1, 64, 1, 1], [1, 1, 64, -2**63, 1], [1, 1, 64, 0, 2], [0, 1, 64, 1, 1],
                  [1, 1, 64, 1.5, 2], [1, 1, 64, True, 2], [1, 1, 64, "2", 1], [1, 1, 64, None, 1],
                  "1,1,64,1,2", None, {"a": 1}):
        vae("negative or invalid shape", str(shape)[:40], samples(shape, data=b"\0" * 512))
    # Header damage.
    vae("bad header", "length 2**64-1", struct.pack("<Q", 2**64 - 1) + good[8:])
    vae("bad header", "length 2**20", struct.pack("<Q", 2**20) + good[8:])
    vae("bad header", "length too short", struct.pack("<Q", 10) + good[8:])
    vae("bad header", "not JSON", struct.pack("<Q", 8) + b"not json" + b"\0" * 512)
    vae("bad header", "JSON list", struct.pack("<Q", 8) + b"[1,2,3] " + b"\0" * 512)
    vae("bad header", "entry not an object", payload({"samples": [1, 2]}, b"\0" * 512))
    vae("bad header", "no offsets", payload({"samples": {"dtype": "F32", "shape": [1, 1, 64, 1, 2]}}, b"\0" * 512))
    vae("bad header", "offsets past the end", samples([1, 1, 64, 1, 2], offsets=[0, 1024], data=b"\0" * 512))
    vae("bad header", "offsets shifted", samples([1, 1, 64, 1, 2], offsets=[4, 516], data=b"\0" * 516))
    vae("bad header", "trailing bytes", samples([1, 1, 64, 1, 2], offsets=[0, 512], data=b"\0" * 600))
    vae("bad header", "non-UTF-8 header", struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc" + b"\0" * 512)
    vae("bad header", "deeply nested", struct.pack("<Q", 20000) + b"[" * 10000 + b"]" * 10000)
    vae("bad values", "NaN", wire.encode({"samples": np.full((1, 1, 64, 1, 2), np.nan, np.float32)}))
    vae("bad values", "inf", wire.encode({"samples": np.full((1, 1, 64, 1, 2), np.inf, np.float32)}))
    # Pickles, of the original's request and of a payload that runs code when unpickled.
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        vae("pickle", f"samples, protocol {protocol}", pickle.dumps({"samples": good_z}, protocol=protocol))
        cap("pickle", f"prompts, protocol {protocol}", pickle.dumps({"prompts": ["a cat"]}, protocol=protocol))
        vae("pickle", f"code, protocol {protocol}", pickle.dumps(_Evil(marker), protocol=protocol))
        cap("pickle", f"code as JSON, protocol {protocol}", pickle.dumps(_Evil(marker), protocol=protocol))
    # Bodies that are not UTF-8.
    for label, body in [("latin-1", '{"prompts": ["café"]}'.encode("latin-1")),
                        ("utf-16", '{"prompts": ["a"]}'.encode("utf-16")),
                        ("utf-32", '{"prompts": ["a"]}'.encode("utf-32")),
                        ("invalid start byte", b'{"prompts": ["\xff"]}'),
                        ("overlong slash", b'{"prompts": ["\xc0\xaf"]}'),
                        ("truncated sequence", b'{"prompts": ["\xe4\xb8"]}'),
                        ("encoded surrogate", b'{"prompts": ["\xed\xa0\x80"]}'),
                        ("lone surrogate escape", b'{"prompts": ["\\ud800"]}'),
                        ("gb18030", '{"prompts": ["一名宇航员"]}'.encode("gb18030"))]:
        cap("non-UTF-8", label, body)
    # Wrong JSON.
    for label, body in [("not JSON", b"a cat"), ("python repr", b"{'prompts': ['a']}"), ("list", b'["a"]'),
                        ("string", b'"a cat"'), ("number", b"1"), ("null", b"null"), ("key typo", b'{"prompt": ["a"]}'),
                        ("extra key", b'{"prompts": ["a"], "api": "caption"}'), ("prompts string", b'{"prompts": "a"}'),
                        ("prompts empty", b'{"prompts": []}'), ("prompts null", b'{"prompts": null}'),
                        ("prompt int", b'{"prompts": [1]}'), ("prompt null", b'{"prompts": [null]}'),
                        ("prompt list", b'{"prompts": [["a"]]}'), ("prompt object", b'{"prompts": [{"a": 1}]}'),
                        ("too many prompts", json.dumps({"prompts": ["a"] * 65}).encode()),
                        ("prompt too long", json.dumps({"prompts": ["a" * 16385]}).encode()),
                        ("deep nesting", b"[" * 100000 + b"]" * 100000),
                        ("truncated", b'{"prompts": ["a"'), ("trailing garbage", b'{"prompts": ["a"]} x'),
                        ("NaN", b'{"prompts": NaN}'), ("huge number", b'{"prompts": [1e999999]}'),
                        ("BOM", b'\xef\xbb\xbf{"prompts": ["a"]}')]:
        cap("wrong JSON", label, body)
    # Wrong content types.
    json_body = wire.encode_prompts(["a cat"])
    for ct in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
               "application/octet-stream", "application/json; charset=latin-1", "application/jsonx", ""):
        cap("wrong content type", f"caption {ct!r}", json_body, {"content-type": ct})
    for ct in ("application/json", "text/plain", "application/x-python-pickle", "image/png", ""):
        vae("wrong content type", f"vae {ct!r}", good, {"content-type": ct})
    # Wrong or missing token.
    for label, value in [("missing", None), ("wrong", "Bearer nope"), ("no scheme", TOKEN),
                         ("basic", "Basic " + TOKEN), ("lower-case scheme", "bearer " + TOKEN),
                         ("extra space", "Bearer  " + TOKEN), ("prefix", f"Bearer {TOKEN[:-1]}"),
                         ("suffix", f"Bearer {TOKEN}x"), ("empty", ""),
                         ("non-ASCII", f"Bearer {TOKEN}Ω".encode("utf-8"))]:
        headers = {"authorization": value} if value is not None else {"authorization": None}
        vae("wrong token", f"vae {label}", good, headers)
        cap("wrong token", f"caption {label}", json_body, headers)
    # Oversized bodies: declared and streamed.
    vae("oversized body", "vae 1 MiB + 1", b"\0" * (BODY_LIMIT + 1))
    vae("oversized body", "vae 8 MiB", b"\0" * (8 * BODY_LIMIT))
    cap("oversized body", "caption 2 MiB JSON", json.dumps({"prompts": ["a" * 1000] * 2100}).encode())
    vae("oversized body", "vae streamed 2 MiB", iter([b"\0" * 65536] * 32))
    cap("oversized body", "caption streamed 2 MiB", iter([b" " * 65536] * 32))
    # Wrong methods and paths.
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        vae("wrong method or path", f"{method} /vae-api", b"", method=method)
        cap("wrong method or path", f"{method} /caption-api", b"", method=method)
    for path in ("/", "/vae", "/caption", "/vae-api/", "/api/vae", "/docs", "/openapi.json"):
        out.append(("wrong method or path", f"POST {path}", "POST", path, {**AUTH, **OCTET}, good))
    return out


def raw_malformed(port: int):
    """(category, label, raw request bytes) that break HTTP itself or lie about sizes."""
    head = f"POST /vae-api HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n".encode()
    ct = b"Content-Type: application/octet-stream\r\n"
    return [
        ("oversized body", "declared 10**12 bytes, none sent", head + ct + b"Content-Length: 1000000000000\r\n\r\n"),
        ("oversized body", "declared 2 MiB, 1 KiB sent", head + ct + b"Content-Length: 2097152\r\n\r\n" + b"\0" * 1024),
        ("broken HTTP", "negative Content-Length", head + ct + b"Content-Length: -5\r\n\r\n"),
        ("broken HTTP", "text Content-Length", head + ct + b"Content-Length: ten\r\n\r\n"),
        ("broken HTTP", "two Content-Lengths", head + ct + b"Content-Length: 3\r\nContent-Length: 5\r\n\r\nabc"),
        ("broken HTTP", "garbage request line", b"HELLO WORLD\r\n\r\n"),
        ("broken HTTP", "bad chunk size", head + ct + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
        ("broken HTTP", "header too large", head + ct + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n"),
    ]


def test_malformed_requests_get_4xx_and_the_service_stays_correct(both, references, tmp_path):
    proc, url = both
    marker = tmp_path / "pickle-ran-code"
    requests = malformed_requests(str(marker))
    tally, failures = {}, []
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    with httpx.Client(base_url=url, timeout=60) as http:
        for category, label, method, path, headers, body in requests:
            headers = {k: v for k, v in headers.items() if v is not None}
            r = http.request(method, path, headers=headers, content=body)
            ok = 400 <= r.status_code < 500
            try:
                message = r.json()["error"]
                ok = ok and isinstance(message, str) and len(message) > 10
            except (ValueError, KeyError, TypeError):
                ok, message = False, r.text[:200]
            tally[category] = tally.get(category, 0) + 1
            if not ok:
                failures.append((category, label, r.status_code, message))
    for category, label, data in raw_malformed(port):
        status = raw_status(host, port, data)
        tally[category] = tally.get(category, 0) + 1
        if not 400 <= status < 500:
            failures.append((category, label, status, "raw"))
    total = sum(tally.values())
    print(f"\nmalformed requests: {total} sent, {total - len(failures)} answered 4xx")
    for category, n in sorted(tally.items()):
        print(f"  {category:28s} {n:4d}")
    assert not failures, failures
    assert total >= 200
    assert not marker.exists(), "a pickled payload ran code on the server"
    # Still alive and still right.
    captions, videos = references
    with RemoteCaption(url, token=TOKEN) as caption, RemoteVae(url, token=TOKEN) as vae:
        assert caption.health()["status"] == "ok"
        assert same_caption(caption.encode(PROMPT_SETS[0]), captions[0])
        assert same_bits(vae.decode(latents(LATENT_SHAPES[0])), videos[LATENT_SHAPES[0]])
    assert proc.proc.poll() is None


def test_concurrent_burst_is_answered_correctly(both, references):
    _, url = both
    captions, videos = references
    jobs = [("caption", i % len(PROMPT_SETS)) for i in range(6)] + [("vae", LATENT_SHAPES[2])] * 4 + \
           [("vae", LATENT_SHAPES[0])] * 2

    def run(job):
        kind, key = job
        if kind == "caption":
            with RemoteCaption(url, token=TOKEN) as c:
                return same_caption(c.encode(PROMPT_SETS[key]), captions[key])
        with RemoteVae(url, token=TOKEN) as v:
            return same_bits(v.decode(latents(key)), videos[key])

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    print(f"\nburst of {len(jobs)} concurrent requests answered in {time.perf_counter() - started:.2f} s")
    assert all(results), results


def test_health_answers_while_a_long_decode_runs(both):
    _, url = both
    shape = (1, 3, 64, 4, 8)  # a few seconds on the tiny VAE
    result = {}

    def decode():
        with RemoteVae(url, token=TOKEN) as v:
            result["video"] = v.decode(latents(shape, seed=7))

    worker = threading.Thread(target=decode)
    worker.start()
    seen_busy, latencies = False, []
    with httpx.Client(timeout=10) as http:
        while worker.is_alive():
            t = time.perf_counter()
            health = http.get(url + "/health").json()
            latencies.append(time.perf_counter() - t)
            seen_busy |= health["busy"] and health["running"] == "vae"
            time.sleep(0.05)
        worker.join()
        assert not http.get(url + "/health").json()["busy"]
    print(f"\n/health during a decode: {len(latencies)} answers, slowest {max(latencies) * 1000:.1f} ms")
    assert seen_busy and result["video"].shape == (1, 17, 3, 64, 128)
    assert max(latencies) < 1.0


def test_client_surfaces_the_service_messages(both):
    _, url = both
    with RemoteCaption(url, token=TOKEN) as caption, pytest.raises(ServiceError) as e:
        caption.encode(["a"] * 65)
    assert e.value.status == 400 and e.value.service == "caption"
    assert str(e.value) == (f"caption service at {url}/caption-api: HTTP 400: "
                            '"prompts" has 65 entries, more than the limit 64')
    with RemoteVae(url, token="wrong") as vae, pytest.raises(ServiceError, match="HTTP 401: missing or wrong token"):
        vae.decode(latents((1, 1, 64, 1, 1)))
    with RemoteVae(url, token=TOKEN) as vae, pytest.raises(ServiceError) as e:
        vae.decode(latents((1, 1, 64, 64, 64)))  # 1 MiB of latents: over this service's body limit
    assert e.value.status == 413 and "exceeds the limit of 1048576 bytes" in e.value.message


def test_latency_overhead_for_a_small_latent(both, local_vae):
    """Remote minus in-process time for the smallest latent, measured alternately (the machine is shared)."""
    _, url = both
    z = latents((1, 1, 64, 1, 1), seed=3)

    def seconds(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    with RemoteVae(url, token=TOKEN) as remote_vae:
        remote_vae.decode(z), local_vae.decode(z)  # warm up both
        pairs = [(seconds(lambda: local_vae.decode(z)), seconds(lambda: remote_vae.decode(z))) for _ in range(9)]
    local_s = statistics.median(p[0] for p in pairs)
    remote_s = statistics.median(p[1] for p in pairs)
    overhead = statistics.median(r - l for l, r in pairs)
    print(f"\nVAE (1,1,64,1,1) -> (1,1,3,16,16), median of 9 alternating runs: in-process {local_s * 1000:.1f} ms, "
          f"remote {remote_s * 1000:.1f} ms, overhead {overhead * 1000:.1f} ms")
    assert overhead < 1.0


# --------------------------------------------------------------------------- a VAE-only service


def test_vae_only_service_waits_for_loading_ipv6_no_token(start_service, tiny_model_dir, local_vae, caplog):
    """Called while still loading (refused, then 503 "loading"): the client retries, then gets the same
    video as in-process."""
    host = "::1" if ipv6_loopback() else "127.0.0.1"
    port = free_port(host)
    proc = start_service(["--model_dir", str(tiny_model_dir), "--enable_llm", "False", "--enable_vae", "True",
                          "--host", host, "--port", str(port)])
    given = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    z = latents((1, 2, 64, 1, 2), seed=5)
    with caplog.at_level(logging.WARNING, logger="stepvideo.serving.client"), \
            RemoteVae(given, connect_wait=180, retry_interval=0.2) as vae:
        video = vae.decode(z)  # sent right after the start: the service is still importing and loading
        health = vae.health()
    urls = proc.wait_ready(timeout=1)
    assert urls == {"vae_url": f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"}
    # refused before the port is bound, then 503 "loading" while the models load: one warning either way
    warnings = [r.getMessage() for r in caplog.records if "retrying for up to" in r.getMessage()]
    assert len(warnings) == 1 and "loading its models" in warnings[0], warnings
    assert same_bits(video, local_vae.decode(z))
    assert health["models"] == {"caption": False, "vae": True} and health["device"] == "CPU"
    with RemoteCaption(given) as caption, pytest.raises(ServiceError, match="HTTP 404: this service does not run "
                                                                            "the caption model"):
        caption.encode(["a"])
    assert "without a token" not in proc.log()  # loopback: no warning


# --------------------------------------------------------------------------- the command line


def load_script():
    spec = importlib.util.spec_from_file_location("call_remote_server", SERVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_line_defaults_and_errors(tmp_path, monkeypatch, capsys):
    script = load_script()
    monkeypatch.delenv("STEPVIDEO_API_TOKEN", raising=False)
    d = str(tmp_path)
    args = script.parse_args(["--model_dir", d])
    assert (args.enable_llm, args.enable_vae, args.host, args.port, args.token) == (True, True, "127.0.0.1", 5000, None)
    assert script.parse_args(["--model_dir", d, "--enable_llm", "False"]).port == 5001
    assert script.parse_args(["--model_dir", d, "--enable_vae", "false"]).port == 5000
    assert script.parse_args(["--model_dir", d, "--port", "7000", "--enable_llm", "0"]).port == 7000
    monkeypatch.setenv("STEPVIDEO_API_TOKEN", "from-env")
    assert script.parse_args(["--model_dir", d]).token == "from-env"
    assert script.parse_args(["--model_dir", d, "--token", "given"]).token == "given"
    for argv, message in [(["--model_dir", d, "--enable_llm", "False", "--enable_vae", "False"], "nothing to serve"),
                          (["--model_dir", d, "--enable_vae", "maybe"], "expected True or False, got 'maybe'"),
                          (["--model_dir", str(tmp_path / "nope")], "is not a folder"),
                          (["--model_dir", d, "--port", "70000"], "--port must be in 0..65535"),
                          (["--model_dir", d, "--max_body_mb", "0"], "--max_body_mb must be > 0"),
                          (["--model_dir", d, "--token", "two words"], "printable ASCII characters without spaces"),
                          ([], "--model_dir")]:
        with pytest.raises(SystemExit) as e:
            script.parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv


def run_server_script(*args: str) -> subprocess.CompletedProcess:
    """`python api/call_remote_server.py ARGS` to its end (no token in its environment), output captured."""
    env = {k: v for k, v in os.environ.items() if k != "STEPVIDEO_API_TOKEN"}
    env.update(GLOG_v="3", PYTHONPATH=str(SERVER.parents[1]))
    return subprocess.run([sys.executable, str(SERVER), *args], capture_output=True, text=True, env=env, timeout=120)


def test_public_address_without_token_warns(tmp_path):
    """192.0.2.1 (TEST-NET-1) is not on this machine: the warning comes, then a clear bind error."""
    r = run_server_script("--model_dir", str(tmp_path), "--host", "192.0.2.1", "--port", "0")
    assert r.returncode == 1, r.stderr
    assert "WARNING: binding 192.0.2.1 without a token" in r.stderr
    assert "error: cannot bind 192.0.2.1:0" in r.stderr


def test_missing_model_files_give_a_one_line_error(tmp_path):
    r = run_server_script("--model_dir", str(tmp_path), "--enable_llm", "False", "--port", "0")
    assert r.returncode == 1, r.stderr
    assert f"error: cannot load the models from {tmp_path}: " in r.stderr and "vae_v2.safetensors" in r.stderr
    assert "Traceback" not in r.stderr
