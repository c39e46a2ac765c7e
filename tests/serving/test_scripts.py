"""scripts/start_servers.sh prints shell-quoted URLs; scripts/stop_servers.sh stops only its own
services, SIGTERM first and SIGKILL after STOP_WAIT.

The services here are stand-ins (the real ones run in tests/e2e and the fuzz test): a program given
as PYTHON_BIN that announces a URL full of shell syntax and ignores SIGTERM, as a hostile or hung
service would.
"""
import os
import shlex
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for `python api/call_remote_server.py ... --enable_llm True|False ...`.
trap '' TERM
if [[ " $* " == *" --enable_llm True "* ]]; then name=caption; else name=vae; fi
echo "${name}_url: http://127.0.0.1:1/\$(touch $MARKER)\`touch $MARKER\`';touch $MARKER;'\"x"
exec -a "$0 $*" sleep 300
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_urls_are_quoted_and_stop_is_term_then_kill_of_own_pids_only(tmp_path):
    marker = tmp_path / "pwned"
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    logs = tmp_path / "logs"
    env = {**os.environ, "PYTHON_BIN": str(fake), "MODEL_DIR": str(tmp_path), "LOG_DIR": str(logs),
           "MARKER": str(marker), "WAIT_SECONDS": "20"}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "start_servers.sh")], env=env, capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    announced = "http://127.0.0.1:1/$(touch {m})`touch {m}`';touch {m};'\"x".format(m=marker)
    # Evaluated as the README and demo.sh do: the URL comes back as text, nothing runs.
    shown = subprocess.run(["bash", "-c", 'eval "$1"; printf "%s\\n%s" "$caption_url" "$vae_url"', "_", out.stdout],
                           capture_output=True, text=True, timeout=10)
    assert shown.stdout == f"{announced}\n{announced}", shown.stderr
    assert [line.split("=", 1)[0] for line in out.stdout.splitlines()] == ["caption_url", "vae_url"]
    assert all(shlex.split(line) == [f"{name}={announced}"] for line, name in
               zip(out.stdout.splitlines(), ["caption_url", "vae_url"]))
    assert not marker.exists()

    pids_file = logs / "services.pids"
    services = [int(p) for p in pids_file.read_text().split()]
    assert len(services) == 2 and all(alive(p) for p in services)
    bystander = subprocess.Popen(["sleep", "300"])  # not a service: its PID in the file must be left alone
    with open(pids_file, "a") as f:
        f.write(f"{bystander.pid}\nnot-a-pid\n")
    started = time.monotonic()
    stop = subprocess.run(["bash", str(ROOT / "scripts" / "stop_servers.sh"), str(pids_file)],
                          env={**os.environ, "STOP_WAIT": "1"}, capture_output=True, text=True, timeout=30)
    seconds = time.monotonic() - started
    print(f"\nstop_servers.sh: {seconds:.2f} s; {stop.stderr.strip()}")
    assert stop.returncode == 0
    assert "still running after 1s; sending SIGKILL" in stop.stderr  # they ignored SIGTERM
    assert 1.0 <= seconds < 5
    time.sleep(0.2)
    assert not any(alive(p) for p in services)
    assert bystander.poll() is None
    bystander.kill()
    bystander.wait()
    assert not pids_file.exists()
