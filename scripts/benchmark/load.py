"""`load`: streaming a sharded DiT checkpoint, measured in a fresh process (`load_probe.py`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmark.flops import DitShape
from benchmark.measure import table
from synthetic_weights import rule_weights

ROOT = Path(__file__).resolve().parents[2]
LOAD_PROBE = Path(__file__).with_name("load_probe.py")


def write_dit_checkpoint(folder: Path, s: DitShape, bf16: bool, shard_mib: int) -> int:
    """A sharded transformer/ folder (config.json + shards + index) with synthetic weights; returns file bytes."""
    from stepvideo.checkpoint import save_sharded
    from stepvideo.modules.model import StepVideoModel
    model = StepVideoModel(num_attention_heads=s.heads, attention_head_dim=s.head_dim, num_layers=s.layers,
                           caption_channels=[s.llm_channels, s.clip_channels])
    tensors = rule_weights({name: p.shape for name, p in model.parameters_and_names()}, salt="benchmark:")
    save_sharded(tensors, folder, "diffusion_pytorch_model", max_shard_bytes=shard_mib * 2**20, bf16=bf16)
    (folder / "config.json").write_text(json.dumps(dict(model.config), default=list))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run(args) -> str:
    """`load`: peak memory and time of streaming a sharded DiT checkpoint, bf16 and fp32 on disk."""
    from stepvideo import backend
    backend.init("cpu")
    if args.quick:
        s = DitShape(layers=2, heads=2, head_dim=128, batch=1, video_tokens=0, text_tokens=0,
                     llm_channels=256, clip_channels=128)
        shard_mib = 4
    else:
        s = DitShape(layers=8, heads=8, head_dim=128, batch=1, video_tokens=0, text_tokens=0,
                     llm_channels=1024, clip_channels=256)
        shard_mib = 100
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bf16 in (True, False):
            folder = Path(tmp) / ("bf16" if bf16 else "fp32")
            file_bytes = write_dit_checkpoint(folder, s, bf16, shard_mib)
            shards = len(list(folder.glob("*.safetensors")))
            run = subprocess.run([sys.executable, str(LOAD_PROBE), str(folder), str(ROOT)], capture_output=True,
                                 text=True, timeout=600, env=dict(os.environ, GLOG_v="3"))
            if run.returncode != 0:
                raise RuntimeError(f"load probe failed (rc={run.returncode}): {run.stderr[-2000:]}")
            probe = json.loads(run.stdout.strip().splitlines()[-1])
            rows.append([f"{s.layers} x {s.dim} DiT", "bf16" if bf16 else "fp32", shards,
                         f"{file_bytes / 2**20:.0f}", f"{probe['bytes'] / 2**20:.0f}", f"{probe['seconds']:.2f}",
                         f"{probe['peak'] / 2**20:.0f}", f"{probe['peak'] / probe['bytes']:.2f}",
                         f"{probe['final'] / probe['bytes']:.2f}"])
    text = table(["checkpoint", "file dtype", "shards", "files MiB", "weights MiB (fp32 params)", "load s",
                  "peak RSS growth MiB", "peak / weights", "final / weights"], rows)
    return text + ("\n\nA fresh process builds the model lazily, resets VmHWM (/proc/self/clear_refs), then streams "
                   "the shards with `load_weights`; growth is measured against the RSS just before loading. "
                   "Target: peak <= 1.3x the weights.")
