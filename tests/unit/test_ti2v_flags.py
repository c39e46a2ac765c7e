"""run_parallel.py's image-to-video flags: the checkpoint's transformer config picks T2V or TI2V.

A TI2V checkpoint needs --first_image and takes TI2V's own defaults (102 frames, its magic prompts)
for the flags the user did not set; a T2V checkpoint refuses an image or a motion score.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from stepvideo.config import (NEG_MAGIC, POS_MAGIC, TI2V_NEG_MAGIC, TI2V_NUM_FRAMES, TI2V_POS_MAGIC,
                              apply_model_kind, parse_args)
from stepvideo.job import StartupError, check_startup
from support import ROOT

CONFIG = {"num_attention_heads": 6, "num_layers": 2, "in_channels": 64, "attention_head_dim": 128}


def folder(tmp_path, ti2v: bool) -> str:
    root = tmp_path / ("ti2v" if ti2v else "t2v")
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps({**CONFIG, "use_additional_conditions": ti2v}))
    return str(root)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "first.png"
    path.write_bytes(b"\x89PNG")  # existence is what start-up checks; the pipeline reads it
    return str(path)


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    monkeypatch.delenv("MS_ROLE", raising=False)


def test_flag_names_and_defaults():
    args = parse_args(["--prompt", "x"])
    assert (args.first_image, args.motion_score) == (None, 5.0)
    assert parse_args(["--first_image_path", "a.png"]).first_image == "a.png"  # the original's name
    assert parse_args(["--first_image", "b.png", "--motion_score", "10"]).motion_score == 10.0


def test_ti2v_checkpoint_takes_its_own_defaults_for_unset_flags(tmp_path, image):
    model = folder(tmp_path, ti2v=True)
    args = parse_args(["--model_dir", model, "--prompt", "x", "--ulysses_degree", "1", "--first_image", image])
    check_startup(args)
    assert (args.num_frames, args.pos_magic, args.neg_magic) == (TI2V_NUM_FRAMES, TI2V_POS_MAGIC, TI2V_NEG_MAGIC)
    assert TI2V_NUM_FRAMES == 102
    args = parse_args(["--model_dir", model, "--prompt", "x", "--ulysses_degree", "1", "--first_image", image,
                       "--num_frames", "204", "--neg_magic", "mine"])
    check_startup(args)
    assert (args.num_frames, args.neg_magic, args.pos_magic) == (204, "mine", TI2V_POS_MAGIC)


def test_t2v_checkpoint_keeps_its_defaults(tmp_path):
    args = parse_args(["--model_dir", folder(tmp_path, ti2v=False), "--prompt", "x", "--ulysses_degree", "1"])
    check_startup(args)
    assert (args.num_frames, args.pos_magic, args.neg_magic) == (204, POS_MAGIC, NEG_MAGIC)


def test_kind_mismatches_are_clear_start_up_errors(tmp_path, image):
    t2v, ti2v = folder(tmp_path, ti2v=False), folder(tmp_path, ti2v=True)
    base = ["--prompt", "x", "--ulysses_degree", "1"]
    with pytest.raises(StartupError, match="give the first frame with --first_image PATH"):
        check_startup(parse_args(["--model_dir", ti2v, *base]))
    with pytest.raises(StartupError, match=r"--first_image .*first.png: this is a text-to-video checkpoint"):
        check_startup(parse_args(["--model_dir", t2v, *base, "--first_image", image]))
    with pytest.raises(StartupError, match="--motion_score: only a Step-Video-TI2V"):
        check_startup(parse_args(["--model_dir", t2v, *base, "--motion_score", "3"]))
    with pytest.raises(StartupError, match="no such image file"):
        check_startup(parse_args(["--model_dir", ti2v, *base, "--first_image", str(tmp_path / "missing.png")]))
    # A config without the field (older diffusers files) is text-to-video.
    assert apply_model_kind(parse_args(["--prompt", "x"]), dict(CONFIG)) is False


def test_run_parallel_stops_on_a_kind_mismatch_before_loading_anything(tmp_path, image):
    """run_parallel.py as a user starts it, an image for a T2V checkpoint: exit 2 with the one-line error. The
    model folder holds only transformer/config.json (no weights) and no service runs, so getting further would
    fail with another error. (No image for a TI2V checkpoint is the same check_startup call, tested above.)"""
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(ROOT), STEPVIDEO_DEVICE="cpu")
    env.pop("MS_ROLE", None)
    model = folder(tmp_path, ti2v=False)
    started = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "run_parallel.py"), "--model_dir", model, "--prompt", "x",
                        "--ulysses_degree", "1", "--first_image", image, "--save_path", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    print(f"image for a T2V checkpoint: exit {r.returncode} after {time.monotonic() - started:.1f} s")
    assert r.returncode == 2, r.stderr
    assert (f"[main] error: --model_dir {model}: --first_image {image}: this is a text-to-video checkpoint"
            in r.stderr), r.stderr
    assert "Traceback" not in r.stderr, r.stderr
