"""The embedded tiny checkpoint: real layout, deterministic, small, fast, and loadable by every loader."""
import hashlib
import json
import subprocess
import sys
import time

from stepvideo.checkpoint import read_config, weight_map
from stepvideo.utils.torch_format import TorchCheckpoint
from support import ROOT

EXPECTED_FILES = {
    "model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors.index.json", "step_llm/config.json",
    "step_llm/model.safetensors.index.json", "step_llm/step1_chat_tokenizer.model",
    "hunyuan_clip/clip_text_encoder/config.json", "hunyuan_clip/clip_text_encoder/pytorch_model.bin",
    "hunyuan_clip/tokenizer/vocab.txt", "hunyuan_clip/tokenizer/tokenizer_config.json",
    "hunyuan_clip/tokenizer/special_tokens_map.json", "vae/vae_v2.safetensors", "vae/config.json",
}


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def build(out):
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_checkpoint.py"), str(out), "--seed", "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return time.perf_counter() - started


def test_layout_size_time_and_determinism(tmp_path):
    seconds = build(tmp_path / "a")
    build(tmp_path / "b")
    a = digest(tmp_path / "a")
    assert a == digest(tmp_path / "b"), "same seed, different bytes"
    assert EXPECTED_FILES <= set(a), sorted(EXPECTED_FILES - set(a))
    size = sum(p.stat().st_size for p in (tmp_path / "a").rglob("*") if p.is_file())
    print(f"tiny checkpoint: {size / 2**20:.1f} MiB ({size / 1e6:.1f} MB) in {seconds:.1f}s")
    assert size <= 50 * 2**20 and seconds <= 60

    root = tmp_path / "a"
    assert json.loads((root / "scheduler/scheduler_config.json").read_text())["reverse"] is False
    dit = read_config(root / "transformer")
    assert dit["num_attention_heads"] == 6 and dit["attention_head_dim"] == 128
    assert all(dit["num_attention_heads"] % u == 0 for u in (1, 2, 3))
    shards = set(weight_map(root / "transformer").values())
    assert len(shards) > 1, "the transformer is sharded with an index, as the published one"
    with TorchCheckpoint(root / "hunyuan_clip/clip_text_encoder/pytorch_model.bin") as ckpt:
        keys = set(ckpt.keys())
    assert "visual.conv1.weight" in keys and "pooler.dense.weight" in keys, "a whole CLIP, as published"


def test_another_seed_gives_other_weights(tmp_path):
    build(tmp_path / "s0")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_checkpoint.py"), str(tmp_path / "s1"),
                    "--seed", "1"], check=True, capture_output=True, timeout=300)
    a, b = digest(tmp_path / "s0"), digest(tmp_path / "s1")
    assert a["vae/vae_v2.safetensors"] != b["vae/vae_v2.safetensors"]
    assert a["step_llm/step1_chat_tokenizer.model"] == b["step_llm/step1_chat_tokenizer.model"]
