"""Serving the app on the socket `stepvideo.serving.listening` holds, until SIGTERM / SIGINT.

    serve(app, sock, on_ready)       # uvicorn; on_ready() once it accepts connections

On SIGTERM the queued model jobs are dropped (their clients get 503) and the running one has the
app's `Limits.shutdown_grace_s` to finish; `Limits.max_connections` caps open connections.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Callable, List, Optional

import uvicorn
from fastapi import FastAPI

if TYPE_CHECKING:
    from stepvideo.serving.limits import Limits

log = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    """On SIGTERM/SIGINT: stop accepting, drop the queued model jobs (their clients get 503), let the
    running job finish for up to the app's grace period, then exit even if it has not (exit code 1;
    0 when everything finished).

    uvicorn itself stops listening and waits `timeout_graceful_shutdown` for open requests;
    `finish` ends the process if the model thread is still busy after that (a device call
    cannot be interrupted, and the interpreter would otherwise wait for it at exit).
    """

    def handle_exit(self, sig, frame) -> None:
        worker = getattr(self.config.app.state, "model_worker", None)
        if worker is not None and not worker.closing:
            dropped = worker.close()
            log.info("signal %s: not accepting requests; dropped %d queued job(s); the running job (%s) has %g s",
                     sig, dropped, worker.running or "none", self.config.timeout_graceful_shutdown or 0)
        super().handle_exit(sig, frame)
        # uvicorn would re-raise the signal once shut down, killing the process before `finish`;
        # the shutdown is handled here, so the process exits normally (0) or from `finish` (1).
        self._captured_signals.clear()

    def finish(self) -> None:
        worker = getattr(self.config.app.state, "model_worker", None)
        if worker is not None and worker.busy:
            log.warning("the grace period of %g s is over and the %s job still runs; exiting without it",
                        self.config.timeout_graceful_shutdown or 0, worker.running)
            logging.shutdown()
            os._exit(1)


def uvicorn_limits(app: FastAPI) -> dict:
    """uvicorn.Config arguments from the app's Limits: connection cap and shutdown grace period."""
    limits: Limits = app.state.limits
    # uvicorn answers 503 once the open connections, the new one included, reach its limit.
    return {"limit_concurrency": limits.max_connections + 1, "timeout_graceful_shutdown": limits.shutdown_grace_s}


def serve(app: FastAPI, sock: socket.socket, on_ready: Callable[[], None], log_level: str = "info") -> None:
    """Serve `app` on the bound `sock` until SIGINT/SIGTERM; `on_ready()` once it accepts connections."""
    class _Server(GracefulServer):
        async def startup(self, sockets: Optional[List[socket.socket]] = None) -> None:
            await super().startup(sockets)
            if self.started:
                on_ready()

    config = uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug", timeout_keep_alive=30,
                            **uvicorn_limits(app))
    server = _Server(config)
    server.run(sockets=[sock])
    server.finish()
