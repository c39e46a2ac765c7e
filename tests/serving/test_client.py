"""Client pieces that need no running service: URL forms, argument checks, and a service that is down."""
import logging
import socket
import time

import pytest

from stepvideo.serving.client import RemoteCaption, RemoteVae, ServiceError, service_url


@pytest.mark.parametrize("given, service, expected", [
    ("127.0.0.1", "caption", "http://127.0.0.1:5000/caption-api"),
    ("127.0.0.1", "vae", "http://127.0.0.1:5001/vae-api"),
    ("localhost:6000", "vae", "http://localhost:6000/vae-api"),
    ("  gpu-node-3  ", "caption", "http://gpu-node-3:5000/caption-api"),
    ("::1", "caption", "http://[::1]:5000/caption-api"),
    ("[::1]", "vae", "http://[::1]:5001/vae-api"),
    ("[fe80::1]:7000", "vae", "http://[fe80::1]:7000/vae-api"),
    ("http://10.0.0.5:8080", "caption", "http://10.0.0.5:8080/caption-api"),
    ("http://10.0.0.5:8080/", "caption", "http://10.0.0.5:8080/caption-api"),
    ("http://10.0.0.5:8080/caption-api", "caption", "http://10.0.0.5:8080/caption-api"),
    ("https://example.org/stepvideo/", "vae", "https://example.org/stepvideo/vae-api"),  # full URL: literal port
    ("http://[::1]:5001/vae-api", "vae", "http://[::1]:5001/vae-api"),
])
def test_url_forms(given, service, expected):
    assert service_url(given, service) == expected


@pytest.mark.parametrize("given, message", [
    ("", "must be a host"),
    ("a b", "must be a host"),
    (None, "must be a host"),
    ("ftp://h:1", "scheme must be http or https"),
    ("http://h:1/x?y=1", "no user, query or fragment"),
    ("http://user:pw@h:1", "no user, query or fragment"),
    ("h:99999", "Port out of range"),
    ("h:abc", "Port could not be cast"),
    ("h:0", "port 0"),
    ("http://:80", "has no host"),
    ("http://h:1/vae-api", "endpoint of the other service"),
])
def test_bad_urls_say_what_is_expected(given, message):
    with pytest.raises(ValueError, match=message):
        service_url(given, "caption")


def test_bad_client_arguments():
    with pytest.raises(ValueError, match="timeout must be a number >= 0"):
        RemoteVae("127.0.0.1", timeout=-1)
    with pytest.raises(ValueError, match="connect_wait must be a number >= 0"):
        RemoteCaption("127.0.0.1", connect_wait=float("nan"))
    with RemoteCaption("127.0.0.1") as c, pytest.raises(ValueError, match=r"prompts\[1\] must be a string"):
        c.encode(["a", 2])
    with RemoteVae("127.0.0.1") as v, pytest.raises(ValueError, match=r"shape \(b, T, 64, h, w\)"):
        v.decode(__import__("numpy").zeros((1, 3, 16, 2, 2), "float32"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_service_down_gives_a_clear_error_after_a_bounded_wait(caplog):
    port = free_port()
    client = RemoteVae(f"127.0.0.1:{port}", connect_wait=1.5, retry_interval=0.3)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="stepvideo.serving.client"), pytest.raises(ServiceError) as e:
        client.decode(__import__("numpy").zeros((1, 3, 64, 2, 2), "float32"))
    waited = time.monotonic() - started
    print(f"service down: error after {waited:.2f} s: {e.value}")
    assert 1.4 <= waited < 5.0
    assert e.value.service == "vae" and e.value.status is None
    assert f"vae service at http://127.0.0.1:{port}/vae-api: not reachable" in str(e.value)
    assert "api/call_remote_server.py" in str(e.value)
    assert any("not accepting connections yet" in r.getMessage() and "still be loading" in r.getMessage()
               for r in caplog.records)
    assert len([r for r in caplog.records if "not accepting" in r.getMessage()]) == 1  # said once, not per retry


# --------------------------------------------------------------------------- a lying server

_LIAR = r"""
import json, socket, sys, threading
import numpy as np
from stepvideo.serving.client import RemoteVae, ServiceError

declared, sent, chunked = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "chunked"
shape = tuple(json.loads(sys.argv[4]))
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()

def answer():
    conn, _ = server.accept()
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
    while len(rest) < length:
        rest += conn.recv(65536)
    if chunked:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"\0" * 2**20
        try:
            for _ in range(sent // len(piece)):
                conn.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        except OSError:
            pass
    else:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % declared
                     + b"\0" * sent)
    conn.close()

threading.Thread(target=answer, daemon=True).start()
client = RemoteVae(f"127.0.0.1:{server.getsockname()[1]}", connect_wait=5)
z = np.zeros(shape, np.float32)
def high_water():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

# Reset the peak: ru_maxrss would also hold the forking test runner's RSS (exec keeps it).
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
baseline = high_water()
try:
    client.decode(z)
    error = None
except ServiceError as e:
    error = str(e)
print(json.dumps({"error": error, "growth": high_water() - baseline}))
"""


def run_liar(declared: int, sent: int, shape, mode: str = "length") -> dict:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(["prlimit", "--as=8000000000", sys.executable, "-c", _LIAR, str(declared), str(sent), mode,
                           json.dumps(shape)], capture_output=True, text=True, timeout=120, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root), "GLOG_v": "3"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_client_never_allocates_what_a_server_only_declares():
    """A server that declares 200 MB (within what (1, 3, 64, 64, 64) can need) and sends 16 bytes."""
    r = run_liar(200 * 10**6, 16, (1, 3, 64, 64, 64))
    print(f"\ndeclared 200 MB, sent 16 bytes: {r['error']}; client RSS growth {r['growth'] / 2**20:.1f} MiB")
    assert "answer broken off" in r["error"]
    assert r["growth"] < 20 * 2**20


def test_client_caps_the_answer_at_what_the_request_implies():
    # (1, 1, 64, 1, 1) decodes to one 16 x 16 frame: 3072 bytes of float32 plus the header.
    r = run_liar(2**31, 16, (1, 1, 64, 1, 1))
    print(f"\ndeclared 2 GiB: {r['error']}; client RSS growth {r['growth'] / 2**20:.1f} MiB")
    assert "answer of 2147483648 bytes exceeds the 68616 bytes this request can need (client limit)" in r["error"]
    assert r["growth"] < 20 * 2**20
    # Without a Content-Length: cut as soon as the stream passes the bound.
    r = run_liar(0, 64 * 2**20, (1, 1, 64, 1, 1), "chunked")
    assert "answer exceeds the 68616 bytes this request can need (client limit)" in r["error"]
    assert r["growth"] < 20 * 2**20
