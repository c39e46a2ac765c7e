"""The port held before the models load, and answered while they do.

    sock = bind_socket(host, port)                       # listening now: a taken port fails at once
    responder = LoadingResponder(sock, {"caption": True, "vae": False}).start()
    ...load the models, build the app...
    responder.stop()                                     # then `stepvideo.serving.running.serve(app, sock, ...)`

No web framework here (sockets and threads, the wire's path names), so a service binds its port
before importing FastAPI and the models: a second service on a taken port fails in about a second.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import select
import socket
import threading
from typing import Dict

from stepvideo.serving.wire import HEALTH_PATH

# Connections that may wait for accept() (uvicorn's default).
_BACKLOG = 2048


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
