import os
import re
import subprocess
import time

import pytest

from support import ROOT


@pytest.fixture
def run_demo(tmp_path):
    """run_demo(model_folder, *args) -> the finished `bash scripts/demo.sh *args`, which must exit 0.

    The demo builds its checkpoint in tmp_path/model_folder, writes its videos to tmp_path/results and its
    logs to tmp_path/logs; its output and the time of each phase are printed.
    """
    def run(model_folder: str, *args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, MODEL_DIR=str(tmp_path / model_folder), SAVE_PATH=str(tmp_path / "results"),
                   LOG_DIR=str(tmp_path / "logs"))
        started = time.perf_counter()
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        elapsed = time.perf_counter() - started
        print(proc.stdout[-4000:])
        assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        phases = re.findall(r"\.\.\. (.+) took (\d+)s", proc.stdout)
        print(f"demo {' '.join(args)}: wall time {elapsed:.0f}s; phases: {phases}")
        return proc

    return run
