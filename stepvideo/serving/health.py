"""Are the services a job needs there, ready, and the right ones? Asked before the job spends anything.

    check_services({"caption": "127.0.0.1", "vae": "127.0.0.1"}, model_dir="ckpts/x", wait_seconds=0)

Each service's GET /health is asked once (or, with `wait_seconds`, until it is ready
or the time is up, with a progress line). What can be wrong, and what the error says:
- nothing answers at the URL: the command that starts the service;
- something else answers (not a Step-Video service, or one without the needed model,
  e.g. the caption URL points at a VAE-only service): what it is, and the command;
- the service is still loading its models (HTTP 503 {"status": "loading"}): wait
  with --wait_services SECONDS, or retry when it prints its URL.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional
from urllib.parse import urlsplit

import httpx

from stepvideo.serving.wire import CAPTION_PATH, DEFAULT_PORTS, HEALTH_PATH, VAE_PATH

_ENDPOINTS = {"caption": CAPTION_PATH, "vae": VAE_PATH}
_NAMES = {"caption": "caption model (Step-LLM + CLIP)", "vae": "VAE"}
_FLAGS = {"caption": "--enable_llm True", "vae": "--enable_vae True"}
_MAX_ANSWER_BYTES = 64 * 1024


class ServicesNotReady(RuntimeError):
    """A needed service is missing, wrong or still loading; the message says which and what to do."""


@dataclass(frozen=True)
class ServiceState:
    """What answered at a service's /health. ready: usable now; waitable: may become ready (starting/loading)."""

    service: str
    url: str
    ready: bool
    waitable: bool
    answer: str


def health_url(url: str, service: str) -> str:
    """The /health URL of the service a user-given URL (host, host:port, full URL) points at."""
    from stepvideo.serving.client import service_url

    endpoint_url = service_url(url, service)
    return endpoint_url[: -len(_ENDPOINTS[service])] + HEALTH_PATH


def start_command(service: str, url: str, model_dir: str, same_port: bool = True) -> str:
    """The command that starts `service` on the host of `url` (on its port unless `same_port` is False)."""
    parts = urlsplit(url)
    command = f"python api/call_remote_server.py --model_dir {model_dir} {_FLAGS[service]}"
    if same_port and parts.port is not None and parts.port != DEFAULT_PORTS[service]:
        command += f" --port {parts.port}"
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        command += f" --host {parts.hostname}  (on that machine)"
    return command


def probe(service: str, url: str, timeout: float = 5.0) -> ServiceState:
    """Ask `url` (a /health URL) once."""
    try:
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            response = client.get(url)
            body = response.content[:_MAX_ANSWER_BYTES]
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
        return ServiceState(service, url, False, True, f"nothing answers ({e or type(e).__name__})")
    except httpx.HTTPError as e:
        return ServiceState(service, url, False, False, f"no usable answer ({type(e).__name__}: {e})")
    try:
        answer = json.loads(body.decode("utf-8"))
    except ValueError:
        answer = None
    models = answer.get("models") if isinstance(answer, dict) else None
    if not isinstance(models, dict):
        text = body.decode("utf-8", "replace").strip()[:200]
        return ServiceState(service, url, False, False, f"HTTP {response.status_code} from something that is not a "
                                                        f"Step-Video service: {text!r}")
    has = [_NAMES[m] for m, on in models.items() if on and m in _NAMES]
    what = "a Step-Video service with " + (" and ".join(has) if has else "no model")
    if not models.get(service):
        return ServiceState(service, url, False, False, f"{what}, not the {_NAMES[service]}")
    if response.status_code == 503 and answer.get("status") == "loading":
        return ServiceState(service, url, False, True, f"{what}, still loading its models")
    if response.status_code != 200:
        return ServiceState(service, url, False, False, f"{what}, answering HTTP {response.status_code}: "
                                                        f"{json.dumps(answer)[:200]}")
    return ServiceState(service, url, True, False, f"{what}, ready")


def check_services(needed: Dict[str, str], model_dir: str, wait_seconds: float = 0.0,
                   progress: Optional[Callable[[str], None]] = None, poll_seconds: float = 2.0,
                   progress_every: float = 10.0) -> None:
    """Return when every service in `needed` ({service: user-given URL}) is ready; else ServicesNotReady.

    wait_seconds: keep asking services that are starting or loading this long; progress(line)
    is called at once and then every `progress_every` seconds while waiting.
    """
    urls = {service: health_url(url, service) for service, url in needed.items()}
    deadline = time.monotonic() + wait_seconds
    started = time.monotonic()
    next_progress = started
    while True:
        states = [probe(service, url) for service, url in urls.items()]
        pending = [s for s in states if not s.ready]
        if not pending:
            return
        wrong = [s for s in pending if not s.waitable]
        now = time.monotonic()
        if wrong or now >= deadline:
            raise ServicesNotReady(_verdict(pending, model_dir, wait_seconds))
        if progress is not None and now >= next_progress:
            progress("waiting for " + "; ".join(f"the {s.service} service at {s.url}: {s.answer}" for s in pending)
                     + f" ({now - started:.0f} s of {wait_seconds:g} s)")
            next_progress = now + progress_every
        time.sleep(min(poll_seconds, max(deadline - now, 0.0)))


def _verdict(pending, model_dir: str, wait_seconds: float) -> str:
    lines = []
    for s in pending:
        lines.append(f"{s.service} service at {s.url}: {s.answer}")
        if s.waitable and "nothing answers" not in s.answer:  # loading
            lines.append("  wait until it prints its URL, or pass --wait_services SECONDS"
                         + (f" (waited {wait_seconds:g} s)" if wait_seconds else ""))
        elif s.waitable:  # nothing there: start it where the URL points
            lines.append(f"  start it with: {start_command(s.service, s.url, model_dir)}")
        else:  # the port is taken by something else: start it on its own port and point the URL there
            host = urlsplit(s.url).hostname
            lines.append(f"  --{s.service}_url must point at the {s.service} service; start one with: "
                         f"{start_command(s.service, s.url, model_dir, same_port=False)}, then pass "
                         f"--{s.service}_url {host}:{DEFAULT_PORTS[s.service]}")
    return "\n".join(lines)
