"""Model calls run one at a time on one thread, off the event loop, and dropped when their client leaves.

    worker = ModelWorker()
    video = await run_for_client(worker, request, "vae", vae.decode, samples, max_waiting=32)

The device runs one request at a time (two models on one accelerator at once risk running out
of its memory, and we do not rely on MindSpore running two networks from two threads at once),
while /health and request parsing stay responsive on the event loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Callable, Dict, Optional

from fastapi import Request

from stepvideo.serving.http_io import ApiError

log = logging.getLogger(__name__)


class ModelWorker:
    """Runs model calls one at a time on a single thread and reports what it is doing.

    A queued call can be dropped (`cancel`: its client went away) and, once the service is
    stopping (`close`), every queued call is dropped and new ones are refused; a call
    already running on the device is never interrupted.
    """

    def __init__(self):
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stepvideo-model")
        self._lock = threading.Lock()
        self._queued: set = set()
        self.closing = False
        self.running: Optional[str] = None
        self.waiting = 0
        self.served: Dict[str, int] = {}
        self.failed: Dict[str, int] = {}
        self.dropped = 0

    def submit(self, what: str, fn: Callable, *args, max_waiting: int) -> concurrent.futures.Future:
        with self._lock:
            if self.closing:
                raise ApiError(503, "the service is shutting down", headers={"Retry-After": "5"})
            if self.waiting >= max_waiting:
                raise ApiError(503, f"{self.waiting} requests are already waiting for the model; try again later",
                               headers={"Retry-After": "5"})
            self.waiting += 1

        def job():
            with self._lock:
                self._queued.discard(future)
                self.waiting -= 1
                self.running = what
            try:
                result = fn(*args)
                with self._lock:
                    self.served[what] = self.served.get(what, 0) + 1
                return result
            except BaseException:
                with self._lock:
                    self.failed[what] = self.failed.get(what, 0) + 1
                raise
            finally:
                with self._lock:
                    self.running = None

        with self._lock:  # job() takes the lock first, so it cannot start before `future` is known
            future = self._executor.submit(job)
            self._queued.add(future)
        return future

    def cancel(self, future: concurrent.futures.Future) -> bool:
        """Drop a call that has not started; False if it is running or done."""
        with self._lock:
            if future not in self._queued or not future.cancel():
                return False
            self._queued.discard(future)
            self.waiting -= 1
            self.dropped += 1
            return True

    def close(self) -> int:
        """Refuse new calls and drop the queued ones; returns how many were dropped."""
        with self._lock:
            self.closing = True
            queued = list(self._queued)
        return sum(self.cancel(f) for f in queued)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self.running is not None

    def status(self) -> dict:
        with self._lock:
            return {"busy": self.running is not None or self.waiting > 0, "running": self.running,
                    "waiting": self.waiting, "served": dict(self.served), "failed": dict(self.failed),
                    "dropped": self.dropped}

    def shutdown(self) -> None:
        self.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


async def _client_gone(request: Request) -> None:
    """Return once the client has closed its connection (the body must have been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_for_client(worker: ModelWorker, request: Request, what: str, fn: Callable, arg, max_waiting: int):
    """fn(arg) on the model worker for this request; if the client goes away while the call is
    still queued, the call is dropped without running (a running call is left to finish)."""
    future = worker.submit(what, fn, arg, max_waiting=max_waiting)
    result = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not result.done():
        if worker.cancel(future):
            log.info("dropped a queued %s job: its client disconnected", what)
        else:
            log.info("the client of the running %s job disconnected; the job finishes", what)
            # Nobody awaits it any more: take its outcome so asyncio does not report it as lost.
            result.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise ApiError(400, "the client disconnected")  # nobody reads it
    if result.cancelled():
        raise ApiError(503, "the service is shutting down; the request was dropped before it ran",
                       headers={"Retry-After": "5"})
    return result.result()
