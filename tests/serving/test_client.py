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
