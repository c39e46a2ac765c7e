"""scripts/run_parallel.sh refuses multi-node settings that cannot work, before starting anything."""
import os
import subprocess

import pytest

from support import ROOT


def launch(**env):
    full = dict(os.environ, DEVICE="cpu", **env)
    return subprocess.run(["bash", str(ROOT / "scripts" / "run_parallel.sh"), "--prompt", "x"], env=full,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("env, message", [
    ({"NODES": "2", "PP": "2", "ULYSSES": "2"},
     "MASTER_PORT is required with NODES=2: every node must use the same scheduler port"),
    ({"NODES": "2", "NODE_RANK": "2", "MASTER_PORT": "8118"}, "NODE_RANK must be 0..1 (got '2')"),
    ({"NODES": "2", "PP": "1", "ULYSSES": "3", "MASTER_PORT": "8118"},
     "PP x CFG x TP x ULYSSES = 3 workers do not split evenly over NODES=2"),
    ({"NODES": "2", "PP": "2", "ULYSSES": "2", "LOCAL_WORKERS": "3", "MASTER_PORT": "8118"},
     "LOCAL_WORKERS=3 x NODES=2 != PP x CFG x TP x ULYSSES = 4 workers"),
    ({"TP": "0"}, "TP must be a positive integer (got '0')"),
])
def test_bad_node_settings_stop_at_once(env, message):
    out = launch(**env)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
