"""Hostile inputs, before and after: what each costs (answer, time, peak RSS).

    python scripts/benchmark_hostile.py bombs --before /work/main          # the PyTorch-reader bombs
    python scripts/benchmark_hostile.py services --before /work/main --model_dir checkpoints/tiny
    python scripts/benchmark_hostile.py client --before /work/main         # a server that lies about sizes

`services` starts the VAE service of each checkout on the tiny checkpoint and sends each attack of
issue 18 to a fresh process, sampling the service's RSS every 50 ms; a process that passes
`--kill_gib` of RSS or `--time_cap` seconds is killed (so a "before" run cannot take the shared
machine down) and the row says so.

Each bomb file is opened by the reader of each checkout (this one, and `--before`'s) in a fresh
process whose address space is capped (`--cap_gib` over its baseline), so a reader that falls
for a bomb gets MemoryError instead of taking the machine down; the table says so when that
happened. Peak RSS is ru_maxrss of the child minus its value after importing the reader.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import bombs  # noqa: E402

MiB = 2**20


def _row(label: str, size: int, result: dict) -> str:
    error = result["error"] or f"no error: produced {result['produced_bytes'] / MiB:.0f} MiB"
    return (f"| {label} | {size} | {error[:150]} | {result['seconds']:.2f} | "
            f"{result['peak_over_baseline'] / MiB:.0f} |")


def run_bombs(before: Path, size: int, cap: int) -> None:
    checkouts = [("before", before), ("after", ROOT)]
    print("| bomb | file bytes | answer | seconds | peak RSS over baseline (MiB) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, build in bombs.BOMBS.items():
            path, _ = build(folder / "bomb.bin", 2**27 if "memo" in name else size) if "opcodes" not in name \
                else build(folder / "bomb.bin")
            for label, root in checkouts:
                print(_row(f"{name} ({label})", path.stat().st_size, bombs.measure(root, "read", path, cap)),
                      flush=True)
            path.unlink()
        convert_dir = folder / "convert"
        convert_dir.mkdir()
        pt, _, _ = bombs.convert_bomb(convert_dir)
        for label, root in checkouts:
            print(_row(f"convert.py, stride-0 CLIP ({label})", pt.stat().st_size,
                       bombs.measure(root, "convert", pt, cap)), flush=True)
            (convert_dir / "model.safetensors").unlink(missing_ok=True)


# --------------------------------------------------------------------------- services


class Service:
    """`api/call_remote_server.py` of a checkout, VAE only, on a free port; RSS sampled in a thread."""

    def __init__(self, root: Path, model_dir: Path, log: Path, extra=()):
        import os
        import subprocess
        import threading
        import time

        import psutil

        env = {**os.environ, "PYTHONPATH": str(root), "GLOG_v": "3", "PYTHONDONTWRITEBYTECODE": "1"}
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, str(root / "api" / "call_remote_server.py"), "--model_dir",
                                      str(model_dir), "--enable_llm", "False", "--port", "0", *extra],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(root))
        deadline = time.monotonic() + 300
        self.url = None
        while self.url is None:
            text = log.read_text(errors="replace")
            self.url = next((l.split(": ", 1)[1] for l in text.splitlines() if l.startswith("vae_url: ")), None)
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"service did not start:\n{text[-2000:]}")
            time.sleep(0.2)
        self.handle = psutil.Process(self.proc.pid)
        self.peak = self.baseline = self.handle.memory_info().rss
        self.killed = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self.kill_bytes = None

    def watch(self, kill_bytes: int) -> None:
        self.kill_bytes = kill_bytes
        self._thread.start()

    def _watch(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                rss = self.handle.memory_info().rss
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, rss)
            if rss > self.kill_bytes and self.killed is None:
                self.killed = f"killed at {rss / 2**30:.1f} GiB RSS"
                self.proc.kill()
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._log.close()


def _post_latents(url: str, shape, time_cap: float, body: bytes = None) -> str:
    import httpx
    import numpy as np

    from stepvideo.serving import wire

    if body is None:
        body = wire.encode({"samples": np.random.default_rng(0).standard_normal(shape).astype(np.float32)})
    try:
        r = httpx.post(url + "/vae-api", content=body, headers={"content-type": wire.MEDIA_TYPE}, timeout=time_cap)
    except httpx.HTTPError as e:
        return f"no answer ({type(e).__name__})"
    try:
        message = r.json().get("error", "")
    except ValueError:
        message = f"{len(r.content)} bytes"
    return f"{r.status_code}: {message[:160]}"


def _unpadded_body() -> bytes:
    import struct

    import numpy as np

    from stepvideo.serving import wire

    good = wire.encode({"samples": np.random.default_rng(0).standard_normal((1, 1, 64, 1, 2)).astype(np.float32)})
    (n,) = struct.unpack_from("<Q", good)
    raw = good[8:8 + n].rstrip(b" ") + b"   "  # data at an offset that is not a multiple of 4
    return struct.pack("<Q", len(raw)) + raw + good[8 + n:]


def _slow_uploads(url: str, count: int, body_bytes: int, hold: float) -> str:
    """`count` connections each send all but 1 KiB of a `body_bytes` body, then wait up to `hold` s."""
    import socket
    import time

    from stepvideo.serving import wire

    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    socks, answers = [], []
    chunk = bytes(2**20)
    for _ in range(count):
        s = socket.create_connection((host, int(port)), timeout=hold + 30)
        s.sendall(f"POST /vae-api HTTP/1.1\r\nHost: {host}\r\nContent-Type: {wire.MEDIA_TYPE}\r\n"
                  f"Content-Length: {body_bytes}\r\n\r\n".encode())
        socks.append(s)
    try:
        for s in socks:
            left = body_bytes - 1024
            try:
                while left > 0:
                    n = min(left, len(chunk))
                    s.sendall(chunk[:n])
                    left -= n
            except OSError:
                pass
        started = time.monotonic()
        for s in socks:
            s.settimeout(max(0.1, hold - (time.monotonic() - started)))
            try:
                answer = s.recv(64)
                answers.append(answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed")
            except OSError:
                answers.append("none")
    finally:
        for s in socks:
            s.close()
    return f"answers {dict((a, answers.count(a)) for a in sorted(set(answers)))} within {hold:g} s"


def _sigterm_with_queue(service: "Service", jobs: int, shape, time_cap: float) -> str:
    import signal
    import threading
    import time

    import httpx

    threads = [threading.Thread(target=_post_latents, args=(service.url, shape, time_cap)) for _ in range(jobs)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            status = httpx.get(service.url + "/health", timeout=5).json()
            if status["running"] and status["waiting"] >= jobs - 1:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    started = time.monotonic()
    service.proc.send_signal(signal.SIGTERM)
    try:
        code = service.proc.wait(time_cap)
        return f"exit {code} {time.monotonic() - started:.1f} s after SIGTERM ({jobs} jobs: 1 running, rest queued)"
    except Exception:  # noqa: BLE001 - the old service may outlive the cap
        return f"still running {time_cap:g} s after SIGTERM ({jobs} jobs: 1 running, rest queued)"


def run_services(before: Path, model_dir: Path, kill_bytes: int, time_cap: float, only=None) -> None:
    import tempfile
    import time

    attacks = [
        ("VAE (1, 3, 64, 24, 24), 442 KB", lambda s: _post_latents(s.url, (1, 3, 64, 24, 24), time_cap)),
        ("VAE (1, 3, 64, 32, 32)", lambda s: _post_latents(s.url, (1, 3, 64, 32, 32), time_cap)),
        ("VAE (1, 1024, 64, 2, 2), 1 MB", lambda s: _post_latents(s.url, (1, 1024, 64, 2, 2), time_cap)),
        ("unpadded safetensors header", lambda s: _post_latents(s.url, None, time_cap, _unpadded_body())),
        ("16 slow uploads of 63 MiB - 1 KiB", lambda s: _slow_uploads(s.url, 16, 63 * 2**20, min(time_cap, 75))),
        ("SIGTERM with 4 jobs of (1, 3, 64, 4, 8)", lambda s: _sigterm_with_queue(s, 4, (1, 3, 64, 4, 8), time_cap)),
    ]
    print(f"| attack | code | answer | seconds | service peak RSS (GiB) | growth (GiB) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, attack in attacks:
            if only and not any(o in name for o in only):
                continue
            for label, root in (("before", before), ("after", ROOT)):
                service = Service(root, model_dir, Path(tmp) / f"{label}.log")
                service.watch(kill_bytes)
                started = time.monotonic()
                try:
                    answer = attack(service)
                finally:
                    seconds = time.monotonic() - started
                    service.stop()
                if service.killed:
                    answer = f"{service.killed} ({answer})"
                print(f"| {name} | {label} | {answer} | {seconds:.2f} | {service.peak / 2**30:.2f} | "
                      f"{(service.peak - service.baseline) / 2**30:.2f} |", flush=True)


def run_client(before: Path) -> None:
    import json
    import os
    import subprocess

    sys.path.insert(0, str(ROOT / "tests" / "serving"))
    from test_client import _LIAR

    print("| server declares / sends | code | client answer | client RSS growth (MiB) |")
    print("|---|---|---|---|")
    for declared, sent, shape in [(2**31, 16, (1, 3, 64, 64, 64)), (200 * 10**6, 16, (1, 3, 64, 64, 64))]:
        for label, root in (("before", before), ("after", ROOT)):
            env = {**os.environ, "PYTHONPATH": str(root), "GLOG_v": "3", "PYTHONDONTWRITEBYTECODE": "1"}
            done = subprocess.run(["prlimit", "--as=8000000000", sys.executable, "-c", _LIAR, str(declared),
                                   str(sent), "length", json.dumps(shape)], capture_output=True, text=True,
                                  timeout=120, cwd=str(root), env=env)
            r = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else \
                {"error": done.stderr.strip().splitlines()[-1][:150], "growth": float("nan")}
            print(f"| {declared} / {sent} bytes | {label} | {str(r['error'])[-150:]} | {r['growth'] / 2**20:.0f} |",
                  flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("bombs", help="the PyTorch-reader bombs")
    b.add_argument("--before", type=Path, required=True, help="checkout with the code before the change")
    b.add_argument("--size_mib", type=int, default=1024, help="what each bomb claims")
    b.add_argument("--cap_gib", type=float, default=3.0, help="address-space cap per reader process")
    v = sub.add_parser("services", help="the service attacks")
    v.add_argument("--before", type=Path, required=True)
    v.add_argument("--model_dir", type=Path, required=True, help="a tiny model folder (make_tiny_checkpoint.py)")
    v.add_argument("--kill_gib", type=float, default=6.0, help="kill a service that passes this RSS")
    v.add_argument("--time_cap", type=float, default=120.0, help="seconds to wait for an answer")
    v.add_argument("--only", nargs="*", help="attacks whose name contains one of these")
    c = sub.add_parser("client", help="a server that declares more than it sends")
    c.add_argument("--before", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.what == "bombs":
        run_bombs(args.before, args.size_mib * MiB, int(args.cap_gib * 2**30))
    elif args.what == "services":
        run_services(args.before, args.model_dir, int(args.kill_gib * 2**30), args.time_cap, args.only)
    else:
        run_client(args.before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
