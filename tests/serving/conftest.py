"""Real service processes for the serving tests, and the tiny model folder they load.

The model folder holds the golden fixtures' Step-LLM and CLIP (the original's weights
for the tiny configs, so the service's numbers are the proven ones) and a tiny VAE
with the real structure and rule-generated weights. Every process is started with
its output in a log file (a pipe nobody reads would fill and block it) and stopped
by a finalizer, whatever the test outcome.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from support import golden

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "api" / "call_remote_server.py"
READY = re.compile(r"^(caption_url|vae_url): (\S+)$", re.M)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def read_status(sock: socket.socket) -> int:
    """The status code of the answer arriving on `sock`; 0 if the server closed it without one."""
    answer = b""
    while b"\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    return int(answer.split(b" ", 2)[1]) if answer else 0


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class ServiceProcess:
    """`python api/call_remote_server.py ARGS` with its output in a log file."""

    def __init__(self, args: List[str], log_path: Path):
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k != "STEPVIDEO_API_TOKEN"}
        path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env.update(GLOG_v="3", PYTHONPATH=path, PYTHONUNBUFFERED="1")
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(SERVER), *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> Dict[str, str]:
        """{"caption_url": ..., "vae_url": ...} as printed once the service accepts connections."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            urls = dict(READY.findall(self.log()))
            if urls:
                return urls
            if self.proc.poll() is not None:
                pytest.fail(f"service exited with code {self.proc.returncode} before it was ready:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        pytest.fail(f"service not ready after {timeout} s:\n{self.log()[-3000:]}")

    def stop(self) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def start_service(tmp_path_factory):
    """start_service(args) -> a started ServiceProcess; all are stopped at the end of the session."""
    started: List[ServiceProcess] = []
    logs = tmp_path_factory.mktemp("service-logs")

    def start(args: List[str]) -> ServiceProcess:
        proc = ServiceProcess(args, logs / f"service-{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """step_llm/ and hunyuan_clip/ from the golden fixtures, vae/ a tiny rule-weight VAE."""
    from stepvideo.checkpoint import named_parameters
    from stepvideo.utils import safetensors_io as st
    from synthetic_weights import rule_weights
    from stepvideo.vae.vae import CHECKPOINT_FILE, AutoencoderKL, VaeConfig

    root = tmp_path_factory.mktemp("tiny-model")
    llm = golden("step_llm")
    for name in ("config.json", "step1_chat_tokenizer.model"):
        _link(llm / name, root / "step_llm" / name)
    _link(llm / "weights.safetensors", root / "step_llm" / "model.safetensors")
    _link(golden("clip") / "hunyuan_clip", root / "hunyuan_clip")

    config = VaeConfig.tiny()
    shapes = {k: tuple(p.shape) for k, p in named_parameters(AutoencoderKL(z_channels=64, config=config)).items()}
    weights = rule_weights(shapes, salt="serving-tests:")
    # Stored under the checkpoint's names: the loader renames decoder.conv_out.* to decoder.conv_out.conv.*.
    weights = {k.replace("decoder.conv_out.conv.", "decoder.conv_out."): w for k, w in weights.items()}
    (root / "vae").mkdir()
    st.save_file(root / "vae" / CHECKPOINT_FILE, weights)
    (root / "vae" / "config.json").write_text(json.dumps(config.to_dict()))
    return root
