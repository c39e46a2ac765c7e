"""Peak memory of loading a sharded bf16 Step-LLM into float32 parameters, in a fresh process.

The published step_llm/ is 39 GB of bf16 shards; on CPU it becomes 78 GB of float32, so
the loader must stream (peak = the loaded parameters + about one tensor in flight). A
mid-sized Step1Model (290 MiB as float32, 145 MiB of shards) is written as bf16 shards + index, a child process
builds the model lazily, resets its peak-RSS counter, loads, and reports the peak growth.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from stepvideo.checkpoint import save_sharded

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"hidden_size": 1024, "num_layers": 6, "num_attention_heads": 8, "num_attention_groups": 2,
          "ffn_hidden_size": 2816, "layernorm_epsilon": 1e-5, "padded_vocab_size": 8192,
          "params_dtype": "torch.bfloat16", "kv_channels": 128}
MAX_RATIO = 1.2

CHILD = textwrap.dedent("""
    import json, sys
    from stepvideo import backend
    backend.init("cpu")
    from stepvideo.checkpoint import load_weights, parameter_count
    from stepvideo.text_encoder.stepllm import Step1Model

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    folder = sys.argv[1]
    net = Step1Model.from_config_dict(json.load(open(folder + "/config.json")))  # lazy: no weight memory
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    report = load_weights(net, folder)
    print(json.dumps({"before": before, "peak": status("VmHWM"), "after": status("VmRSS"),
                      "param_bytes": report.bytes, "tensors": report.tensors,
                      "params": parameter_count(net), "seconds": report.seconds}))
""")


def write_checkpoint(folder: Path) -> int:
    """bf16 shards of random weights for CONFIG, with the model's own names and shapes; returns file bytes."""
    from stepvideo.checkpoint import named_parameters
    from stepvideo.text_encoder.stepllm import Step1Model

    shapes = {k: tuple(p.shape) for k, p in named_parameters(Step1Model.from_config_dict(CONFIG)).items()}
    rng = np.random.default_rng(0)
    tensors = {k: (0.02 * rng.standard_normal(s, dtype=np.float32)) for k, s in shapes.items()}
    save_sharded(tensors, folder, "model", max_shard_bytes=48 * 2**20, bf16=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def test_sharded_load_peak_memory(tmp_path):
    if not Path("/proc/self/clear_refs").exists():
        pytest.fail("this test needs Linux /proc to reset and read the peak RSS")
    folder = tmp_path / "step_llm"
    folder.mkdir()
    try:
        file_bytes = write_checkpoint(folder)
        assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 4
        env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(ROOT))
        run = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=300)
    finally:
        shutil.rmtree(folder)  # 145 MB that pytest would otherwise keep with its last temp dirs
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads(run.stdout.strip().splitlines()[-1])
    assert m["param_bytes"] == 4 * m["params"]  # bf16 on disk, float32 parameters
    assert abs(m["param_bytes"] - 2 * file_bytes) < 2**20  # the shards' headers are the only other bytes
    ratio = (m["peak"] - m["before"]) / m["param_bytes"]
    print(f"\nStep-LLM sharded bf16 load: {m['tensors']} tensors, {m['param_bytes'] / 2**20:.1f} MiB float32 "
          f"parameters from {file_bytes / 2**20:.1f} MiB of shards in {m['seconds']:.2f} s; RSS before "
          f"{m['before'] / 2**20:.0f} MiB, peak {m['peak'] / 2**20:.0f} MiB, after {m['after'] / 2**20:.0f} MiB; "
          f"peak growth / parameter bytes = {ratio:.3f}")
    assert ratio <= MAX_RATIO, f"peak growth {ratio:.3f} x the parameter bytes, expected <= {MAX_RATIO}"
