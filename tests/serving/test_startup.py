"""Service start-up as users run it: which models the flags mean, the port held before loading,
/health while loading, and the DiT job's check of its services (real processes on loopback)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import httpx
import pytest

from conftest import SERVER, free_port
from stepvideo.serving.health import ServicesNotReady, check_services


def load_script():
    spec = importlib.util.spec_from_file_location("call_remote_server", SERVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flags, served, port, warns", [
    ([], (True, True), 5000, False),  # the original's one-process mode
    (["--enable_vae", "True"], (False, True), 5001, False),  # published: VAE service
    (["--enable_llm", "True"], (True, False), 5000, False),  # published: caption service
    (["--enable_llm", "True", "--enable_vae", "True"], (True, True), 5000, True),
    (["--enable_llm", "True", "--enable_vae", "False"], (True, False), 5000, False),  # our README until now
    (["--enable_llm", "False", "--enable_vae", "True"], (False, True), 5001, False),
    (["--enable_llm", "False"], (False, True), 5001, False),
    (["--enable_vae", "False"], (True, False), 5000, False),
])
def test_only_the_flags_named_decide(tmp_path, monkeypatch, flags, served, port, warns):
    monkeypatch.delenv("STEPVIDEO_API_TOKEN", raising=False)
    args = load_script().parse_args(["--model_dir", str(tmp_path), *flags])
    assert ((args.enable_llm, args.enable_vae), args.port, args.warn_memory) == (served, port, warns)


def _env():
    env = {k: v for k, v in os.environ.items() if k != "STEPVIDEO_API_TOKEN"}
    env.update(GLOG_v="3", PYTHONPATH=str(SERVER.parents[1]), PYTHONUNBUFFERED="1")
    return env


def _health(port: int):
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5, trust_env=False)
    except httpx.HTTPError:
        return None
    return r.status_code, r.json()


def test_port_is_held_while_loading_health_says_loading_and_a_second_service_fails_fast(start_service,
                                                                                         tiny_model_dir):
    port = free_port()
    proc = start_service(["--model_dir", str(tiny_model_dir), "--enable_vae", "True", "--port", str(port)])
    seen, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:
        answer = _health(port)
        if answer is not None and (not seen or answer != seen[-1]):
            seen.append(answer)
        if answer is not None and answer[0] == 200:
            break
        time.sleep(0.05)
    assert seen[0] == (503, {"status": "loading", "models": {"caption": False, "vae": True}}), seen
    assert seen[-1][0] == 200 and seen[-1][1]["status"] == "ok"
    assert seen[-1][1]["models"] == {"caption": False, "vae": True}
    assert "serving both" not in proc.log()

    # While loading the port was already listening; now a second service on it fails at once.
    started = time.monotonic()
    second = subprocess.run([sys.executable, str(SERVER), "--model_dir", str(tiny_model_dir), "--enable_llm", "True",
                             "--port", str(port)], capture_output=True, text=True, env=_env(), timeout=60)
    took = time.monotonic() - started
    print(f"second service on a taken port: exit {second.returncode} after {took:.2f} s: {second.stderr.strip()}")
    assert second.returncode != 0 and took < 5.0
    assert f"cannot bind 127.0.0.1:{port}: Address already in use" in second.stderr
    assert "choose another with --port" in second.stderr


def test_a_second_service_fails_fast_while_the_first_is_still_loading(start_service, tiny_model_dir):
    """The case that used to fail minutes later: both bound, neither listening until loaded."""
    port = free_port()
    first = start_service(["--model_dir", str(tiny_model_dir), "--port", str(port)])  # no flag: both models
    deadline = time.monotonic() + 60
    while _health(port) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    answer = _health(port)
    assert answer == (503, {"status": "loading", "models": {"caption": True, "vae": True}}), answer
    started = time.monotonic()
    second = subprocess.run([sys.executable, str(SERVER), "--model_dir", str(tiny_model_dir), "--enable_llm", "True",
                             "--enable_vae", "True", "--port", str(port)],
                            capture_output=True, text=True, env=_env(), timeout=60)
    took = time.monotonic() - started
    print(f"second service while the first loads: exit {second.returncode} after {took:.2f} s")
    assert second.returncode != 0 and took < 5.0 and f"127.0.0.1:{port}" in second.stderr
    # both named True: the memory warning; no flag (the original's one-process mode): none
    assert "serving both the caption model (Step-LLM + CLIP) and the VAE in this process" in second.stderr
    first.wait_ready()
    assert "serving both" not in first.log()


# --------------------------------------------------------------------------- the DiT job's check


def test_service_check_names_url_answer_and_command(start_service, tiny_model_dir):
    port = free_port()
    vae_only = start_service(["--model_dir", str(tiny_model_dir), "--enable_vae", "True", "--port", str(port)])

    # Still loading: an error at once, or with a wait a progress line and then success.
    deadline = time.monotonic() + 60
    while _health(port) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(ServicesNotReady) as e:
        check_services({"vae": f"127.0.0.1:{port}"}, model_dir="M")
    assert str(e.value).startswith(f"vae service at http://127.0.0.1:{port}/health: a Step-Video service with VAE, "
                                   "still loading its models")
    assert "--wait_services SECONDS" in str(e.value)
    lines = []
    check_services({"vae": f"127.0.0.1:{port}"}, model_dir="M", wait_seconds=120, progress=lines.append,
                   poll_seconds=0.2)
    assert lines and "still loading its models" in lines[0] and "s of 120 s)" in lines[0]
    vae_only.wait_ready(timeout=5)

    # The caption URL points at the VAE-only service.
    started = time.monotonic()
    with pytest.raises(ServicesNotReady) as e:
        check_services({"caption": f"127.0.0.1:{port}", "vae": f"127.0.0.1:{port}"}, model_dir="M", wait_seconds=60)
    assert time.monotonic() - started < 5, "a wrong service is not worth waiting for"
    assert str(e.value) == (f"caption service at http://127.0.0.1:{port}/health: a Step-Video service with VAE, not "
                            "the caption model (Step-LLM + CLIP)\n"
                            "  --caption_url must point at the caption service; start one with: "
                            "python api/call_remote_server.py --model_dir M --enable_llm True, then pass "
                            "--caption_url 127.0.0.1:5000")

    # Nothing there.
    missing = free_port()
    started = time.monotonic()
    with pytest.raises(ServicesNotReady) as e:
        check_services({"caption": f"127.0.0.1:{missing}"}, model_dir="M")
    print(f"missing service: error after {time.monotonic() - started:.2f} s")
    assert f"caption service at http://127.0.0.1:{missing}/health: nothing answers" in str(e.value)
    assert str(e.value).endswith(f"  start it with: python api/call_remote_server.py --model_dir M --enable_llm True "
                                 f"--port {missing}")

    # Something that is not a Step-Video service (an HTTP server without /health JSON).
    other = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(missing)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{missing}/", timeout=2, trust_env=False)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        with pytest.raises(ServicesNotReady, match="HTTP 404 from something that is not a Step-Video service"):
            check_services({"vae": f"127.0.0.1:{missing}"}, model_dir="M", wait_seconds=30)
    finally:
        other.terminate()
        other.wait(10)
