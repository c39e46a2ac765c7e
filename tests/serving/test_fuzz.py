"""Fuzzing the real services: hundreds of malformed or unusual requests per endpoint.

The caption and VAE services run as the README starts them (two `api/call_remote_server.py`
processes, --enable_llm True/False, on free ports, with --body_timeout 2 so slow bodies are cut
quickly). Requests are generated from a fixed seed: truncations and byte flips of valid bodies,
unpadded safetensors headers, wrong dtypes and shapes, huge declared sizes, pickles (one of which
would run a command), wrong content types, random bytes, slow bodies, odd methods and queries.

Every answer must be 2xx or 4xx, the pickled command must not run, /health must answer 200 after,
and a valid request must give the same bytes before and after.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import pickle
import socket
import struct
import time

import httpx
import numpy as np
import pytest

from stepvideo.serving import wire

pytestmark = pytest.mark.slow

SEED = 18
OCTET = {"content-type": wire.MEDIA_TYPE}
JSON_CT = {"content-type": wire.JSON_MEDIA_TYPE}
VALID_Z = np.random.default_rng(0).standard_normal((1, 1, 64, 1, 2)).astype(np.float32)
VALID_PROMPTS = ["A cat walks on the grass, realistic style.", ""]


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _payload(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _unpadded(payload: bytes, extra: int) -> bytes:
    (n,) = struct.unpack_from("<Q", payload)
    raw = payload[8:8 + n].rstrip(b" ") + b" " * extra
    return struct.pack("<Q", len(raw)) + raw + payload[8 + n:]


def _flip(rng, data: bytes, flips: int, within: int = None) -> bytes:
    """`flips` random bits of `data` flipped (in its first `within` bytes if given)."""
    out = bytearray(data)
    for _ in range(flips):
        i = int(rng.integers(within or len(out)))
        out[i] ^= 1 << int(rng.integers(8))
    return bytes(out)


def _pickles(marker: str):
    evil = _RunsCommand(f"touch {marker}")
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        yield pickle.dumps({"samples": VALID_Z}, protocol=protocol)
        yield pickle.dumps({"prompts": ["a cat"]}, protocol=protocol)
        yield pickle.dumps(evil, protocol=protocol)


def vae_requests(rng, marker: str):
    """(label, headers, body) for /vae-api."""
    good = wire.encode({"samples": VALID_Z})
    (n,) = struct.unpack_from("<Q", good)
    out = []
    for cut in sorted(set(rng.integers(0, len(good), 40).tolist())):
        out.append((f"truncated at {cut}", OCTET, good[:cut]))
    for i in range(100):
        # Two in three in the header (what parsing must survive); a flip in the data is mostly a valid
        # request that runs the model, which makes the test slow, not stronger.
        within = None if i % 3 == 0 else 8 + n
        out.append((f"{1 + i % 3} flipped bits #{i}", OCTET, _flip(rng, good, 1 + i % 3, within)))
    for extra in range(8):
        out.append((f"unpadded header +{extra}", OCTET, _unpadded(good, extra)))
    for dtype, size in [("F64", 8), ("I64", 8), ("I32", 4), ("U8", 1), ("BOOL", 1), ("I16", 2), ("I8", 1),
                        ("F16", 2), ("BF16", 2), ("F8_E4M3", 1), ("", 4), ("f32", 4)]:
        for shape in ([1, 1, 64, 1, 2], [1, 64, 1, 2]):
            count = int(np.prod(shape))
            out.append((f"dtype {dtype} shape {shape}", OCTET, _payload(
                {"samples": {"dtype": dtype, "shape": shape, "data_offsets": [0, count * size]}}, bytes(count * size))))
    for i in range(45):
        rank = int(rng.integers(0, 8))
        shape = [int(v) for v in rng.choice([0, 1, 2, 3, 64, 65, 513, 2**31, 2**40, -1], rank)]
        out.append((f"shape {shape}", OCTET, _payload(
            {"samples": {"dtype": "F32", "shape": shape, "data_offsets": [0, 512]}}, bytes(512))))
    for length in (2**64 - 1, 2**63, 2**32, 2**20, 65537, n + 1, n - 1, 0, 1, 7):
        out.append((f"header length {length}", OCTET, struct.pack("<Q", length) + good[8:]))
    for label, header in [("duplicate key", b'{"samples":{"dtype":"F32","shape":[1,1,64,1,2],"data_offsets":[0,512]},'
                                            b'"samples":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'),
                          ("metadata junk", None), ("nested metadata", None), ("offsets as strings", None),
                          ("offsets reversed", None), ("offsets float", None), ("extra tensor", None),
                          ("no tensors", b"{}"), ("json null", b"null"), ("json list", b"[]"),
                          ("deep nesting", b"[" * 5000 + b"]" * 5000)]:
        if header is None:
            meta = {"dtype": "F32", "shape": [1, 1, 64, 1, 2], "data_offsets": [0, 512]}
            tensors = {"samples": meta}
            if label == "metadata junk":
                tensors["__metadata__"] = {"a": "b" * 1000}
            elif label == "nested metadata":
                tensors["__metadata__"] = {"a": {"b": [1, 2, {"c": None}]}}
            elif label == "offsets as strings":
                meta["data_offsets"] = ["0", "512"]
            elif label == "offsets reversed":
                meta["data_offsets"] = [512, 0]
            elif label == "offsets float":
                meta["data_offsets"] = [0.0, 512.0]
            elif label == "extra tensor":
                tensors["x"] = {"dtype": "F32", "shape": [1], "data_offsets": [512, 516]}
            header = json.dumps(tensors).encode()
        out.append((label, OCTET, struct.pack("<Q", len(header)) + header + bytes(516)))
    for i, body in enumerate(_pickles(marker)):
        out.append((f"pickle #{i}", OCTET, body))
    for ct in ("application/json", "text/plain", "application/x-python-pickle", "image/png", "",
               "application/octet-stream; charset=utf-8", "APPLICATION/OCTET-STREAM", "application/octet-stream;;",
               "multipart/form-data; boundary=x", "application/octet-streamx"):
        out.append((f"content type {ct!r}", {"content-type": ct}, good))
    for i in range(30):
        out.append((f"random bytes #{i}", OCTET, rng.bytes(int(rng.integers(1, 4096)))))
    for label, body in [("NaN", wire.encode({"samples": np.full((1, 1, 64, 1, 2), np.nan, np.float32)})),
                        ("inf", wire.encode({"samples": np.full((1, 1, 64, 1, 2), -np.inf, np.float32)})),
                        ("json prompts", wire.encode_prompts(["a cat"])), ("empty", b"")]:
        out.append((label, OCTET, body))
    return out


def caption_requests(rng, marker: str):
    """(label, headers, body) for /caption-api."""
    good = wire.encode_prompts(VALID_PROMPTS)
    out = []
    for cut in sorted(set(rng.integers(0, len(good), 40).tolist())):
        out.append((f"truncated at {cut}", JSON_CT, good[:cut]))
    for i in range(110):
        out.append((f"{1 + i % 3} flipped bits #{i}", JSON_CT, _flip(rng, good, 1 + i % 3)))
    for label, value in [("list", ["a"]), ("string", "a"), ("number", 1), ("null", None), ("true", True),
                         ("key typo", {"prompt": ["a"]}), ("extra key", {"prompts": ["a"], "x": 1}),
                         ("prompts string", {"prompts": "a"}), ("prompts empty", {"prompts": []}),
                         ("prompts null", {"prompts": None}), ("prompt int", {"prompts": [1]}),
                         ("prompt null", {"prompts": [None]}), ("prompt list", {"prompts": [["a"]]}),
                         ("prompt object", {"prompts": [{"a": 1}]}), ("prompt float", {"prompts": [1.5]}),
                         ("too many prompts", {"prompts": ["a"] * 65}), ("prompt too long", {"prompts": ["a" * 16385]}),
                         ("mixed", {"prompts": ["a", 2, None]}), ("nested prompts", {"prompts": {"prompts": ["a"]}})]:
        out.append((f"json {label}", JSON_CT, json.dumps(value).encode()))
    for label, body in [("latin-1", '{"prompts": ["café"]}'.encode("latin-1")),
                        ("utf-16", '{"prompts": ["a"]}'.encode("utf-16")),
                        ("utf-32", '{"prompts": ["a"]}'.encode("utf-32")),
                        ("invalid start byte", b'{"prompts": ["\xff"]}'), ("overlong", b'{"prompts": ["\xc0\xaf"]}'),
                        ("truncated sequence", b'{"prompts": ["\xe4\xb8"]}'),
                        ("encoded surrogate", b'{"prompts": ["\xed\xa0\x80"]}'),
                        ("lone surrogate escape", b'{"prompts": ["\\ud800"]}'),
                        ("gb18030", '{"prompts": ["一名宇航员"]}'.encode("gb18030")),
                        ("BOM", b'\xef\xbb\xbf{"prompts": ["a"]}'), ("NUL", b'{"prompts": ["a\x00"]}'),
                        ("deep nesting", b"[" * 100000 + b"]" * 100000), ("NaN", b'{"prompts": NaN}'),
                        ("huge number", b'{"prompts": [1e999999]}'), ("python repr", b"{'prompts': ['a']}"),
                        ("trailing garbage", b'{"prompts": ["a"]} x'), ("empty", b""), ("spaces", b"   ")]:
        out.append((label, JSON_CT, body))
    for i in range(40):
        # Random unusual but valid prompts: control characters, emoji, RTL, escapes (some answer 200).
        chars = [chr(int(c)) for c in rng.integers(1, 0x2FFFF, int(rng.integers(0, 40)))]
        text = "".join(c for c in chars if not 0xD800 <= ord(c) <= 0xDFFF)
        prompts = [text] * int(rng.integers(1, 3)) if i % 4 == 0 else [text, 7] if i % 4 == 1 else {"prompts": text}
        body = json.dumps({"prompts": prompts} if not isinstance(prompts, dict) else prompts).encode()
        out.append((f"unicode #{i}", JSON_CT, body))
    for i, body in enumerate(_pickles(marker)):
        out.append((f"pickle #{i}", JSON_CT, body))
    for ct in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
               "application/octet-stream", "application/json; charset=latin-1", "application/jsonx", "",
               "application/json; charset=utf-16", "text/json", "application/*"):
        out.append((f"content type {ct!r}", {"content-type": ct}, good))
    for i in range(30):
        out.append((f"random bytes #{i}", JSON_CT, rng.bytes(int(rng.integers(1, 4096)))))
    for i in range(25):
        out.append((f"random JSON-ish #{i}", JSON_CT, bytes(rng.choice(list(b'{}[]",:0123456789.eE-+ntrufals\\ '),
                                                                       int(rng.integers(1, 200))).tolist())))
    return out


def health_requests(rng):
    out = []
    for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        out.append((f"{method} /health", method, "/health", {}, b""))
    for i in range(25):
        query = "&".join(f"{rng.bytes(3).hex()}={rng.bytes(2).hex()}" for _ in range(int(rng.integers(1, 5))))
        out.append((f"query #{i}", "GET", f"/health?{query}", {}, b""))
    for path in ("/health/", "/HEALTH", "/health%00", "//health", "/health/../vae-api", "/", "/docs", "/openapi.json",
                 "/health;x", "/%2e%2e/health"):
        out.append((f"path {path}", "GET", path, {}, b""))
    for i in range(10):
        out.append((f"GET with body #{i}", "GET", "/health", OCTET, rng.bytes(100)))
    return out


def raw_requests(host: str, port: int, path: str, content_type: str):
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n".encode()
    out = []
    for declared in (10**12, 2**63 - 1, 2**64, 65 * 2**20, 2 * 2**20):
        out.append((f"declared {declared}, 1 KiB sent", head + f"Content-Length: {declared}\r\n\r\n".encode() + bytes(8)))
    for label, value in [("negative", b"-5"), ("text", b"ten"), ("hex", b"0x10"), ("spaces", b" 5 5"),
                         ("two", b"3\r\nContent-Length: 5")]:
        out.append((f"Content-Length {label}", head + b"Content-Length: " + value + b"\r\n\r\nabcde"))
    out.append(("bad chunk size", head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"))
    out.append(("huge chunk size", head + b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffff\r\nabc\r\n0\r\n\r\n"))
    out.append(("header too large", head + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n"))
    out.append(("garbage request line", b"HELLO WORLD\r\n\r\n"))
    out.append(("HTTP/0.9", f"GET {path}\r\n\r\n".encode()))
    return out


def raw_status(host: str, port: int, data: bytes, timeout: float = 30) -> int:
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:  # the server may answer and close before taking everything
            pass
        answer = b""
        while b"\r\n" not in answer:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def slow_status(host: str, port: int, path: str, content_type: str, body: bytes) -> int:
    """Send half of `body` slowly, then nothing more: the service must cut it at its body timeout."""
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode())
        try:
            for i in range(0, len(body) // 2, 16):
                s.sendall(body[i:i + 16])
                time.sleep(0.05)
        except OSError:  # the service answered and closed the connection: read its answer
            pass
        answer = s.recv(4096)
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


@pytest.fixture(scope="module")
def services(start_service, tiny_model_dir):
    extra = ["--port", "0", "--body_timeout", "2"]
    caption = start_service(["--model_dir", str(tiny_model_dir), "--enable_llm", "True", "--enable_vae", "False",
                             *extra])
    vae = start_service(["--model_dir", str(tiny_model_dir), "--enable_llm", "False", "--enable_vae", "True", *extra])
    return {"caption": (caption, caption.wait_ready()["caption_url"]), "vae": (vae, vae.wait_ready()["vae_url"])}


def _valid(http: httpx.Client, caption_url: str, vae_url: str) -> tuple:
    a = http.post(caption_url + "/caption-api", content=wire.encode_prompts(VALID_PROMPTS), headers=JSON_CT)
    b = http.post(vae_url + "/vae-api", content=wire.encode({"samples": VALID_Z}), headers=OCTET)
    assert a.status_code == b.status_code == 200
    return a.content, b.content


def test_fuzz_every_answer_is_2xx_or_4xx_and_the_services_stay_right(services, tmp_path):
    rng = np.random.default_rng(SEED)
    marker = tmp_path / "pickle-ran-code"
    (caption_proc, caption_url), (vae_proc, vae_url) = services["caption"], services["vae"]
    started = time.perf_counter()
    tally, failures = {}, []

    def record(endpoint, label, status):
        counts = tally.setdefault(endpoint, {})
        counts[status // 100] = counts.get(status // 100, 0) + 1
        if status // 100 not in (2, 4):
            failures.append((endpoint, label, status))

    with httpx.Client(timeout=60) as http:
        before = _valid(http, caption_url, vae_url)
        for endpoint, url, requests in (("/vae-api", vae_url, vae_requests(rng, str(marker))),
                                        ("/caption-api", caption_url, caption_requests(rng, str(marker)))):
            for label, headers, body in requests:
                record(endpoint, label, http.post(url + endpoint, content=body, headers=headers).status_code)
            host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
            content_type = OCTET["content-type"] if endpoint == "/vae-api" else JSON_CT["content-type"]
            for label, data in raw_requests(host, int(port), endpoint, content_type):
                record(endpoint, label, raw_status(host, int(port), data))
            body = wire.encode({"samples": VALID_Z}) if endpoint == "/vae-api" else wire.encode_prompts(VALID_PROMPTS)
            with concurrent.futures.ThreadPoolExecutor(6) as pool:  # slow bodies, side by side
                slow = list(pool.map(lambda _: slow_status(host, int(port), endpoint, content_type, body * 20),
                                     range(6)))
            for status in slow:
                record(endpoint, "slow body", status)
            assert slow == [408] * 6, slow
        for label, method, path, headers, body in health_requests(rng):
            for url in (caption_url, vae_url):
                record("/health", label, http.request(method, url + path, headers=headers, content=body).status_code)
        after = _valid(http, caption_url, vae_url)
        health = [http.get(url + "/health") for url in (caption_url, vae_url)]
    seconds = time.perf_counter() - started
    print(f"\nfuzz: {sum(sum(c.values()) for c in tally.values())} requests in {seconds:.1f} s")
    for endpoint, counts in tally.items():
        print(f"  {endpoint:14s} " + ", ".join(f"{k}xx: {v}" for k, v in sorted(counts.items())))
    assert not failures, failures[:20]
    assert sum(tally["/vae-api"].values()) >= 300 and sum(tally["/caption-api"].values()) >= 300
    assert not marker.exists(), "a pickled payload ran code on the server"
    assert all(r.status_code == 200 and r.json()["status"] == "ok" for r in health)
    assert after == before  # bit-identical answers to the same valid requests
    assert caption_proc.proc.poll() is None and vae_proc.proc.poll() is None
    for proc in (caption_proc, vae_proc):
        assert "Traceback" not in proc.log(), proc.log()[-3000:]
