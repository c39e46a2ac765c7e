"""Post-processing and mp4 writing (real ffmpeg from imageio-ffmpeg, read back)."""
import numpy as np
import pytest

from stepvideo.utils.video_process import VideoProcessor, crop_to_540p, read_mp4, safe_stem, to_uint8_frames


def test_uint8_conversion_matches_the_original_formula():
    v = np.array([-2.0, -1.0, -0.5, 0.0, 0.004, 0.5, 0.999, 1.0, 3.0], np.float32)
    video = np.broadcast_to(v[None, None, None, None, :], (1, 1, 3, 1, v.size))
    got = to_uint8_frames(video)[0, 0, :, 0]
    # (clamp(x, -1, 1) + 1) * 127.5, truncated: written out by hand
    assert got.tolist() == [0, 0, 63, 127, 128, 191, 254, 255, 255]


def test_batch_is_stacked_along_height():
    video = np.zeros((2, 3, 3, 4, 5), np.float32)
    video[1] = 1.0
    frames = to_uint8_frames(video)
    assert frames.shape == (3, 8, 5, 3)
    assert (frames[:, :4] == 127).all() and (frames[:, 4:] == 255).all()


def test_crop_to_540p_landscape_portrait_and_small():
    land = np.zeros((2, 544, 992, 3), np.uint8)
    assert crop_to_540p(land).shape == (2, 540, 960, 3)
    port = np.zeros((1, 992, 544, 3), np.uint8)
    assert crop_to_540p(port).shape == (1, 960, 540, 3)
    small = np.zeros((1, 64, 96, 3), np.uint8)
    assert crop_to_540p(small).shape == small.shape
    land[:, 2:542, 16:976] = 9
    assert (crop_to_540p(land) == 9).all()


@pytest.mark.parametrize("text, expected", [
    ("A cat walks on the grass", "A_cat_walks_on_the_grass"),
    ("../../etc/passwd", "etc_passwd"),
    ("a/b\\c:d*e?f\"g<h>i|j\x00k\nl", "a_b_c_d_e_f_g_h_i_j_k_l"),
    ("", "video"),
    ("一只猫在草地上散步", "一只猫在草地上散步"),
    ("x" * 300, "x" * 50),
])
def test_file_names_are_sanitised(text, expected):
    assert safe_stem(text) == expected


def test_mp4_written_atomically_and_read_back(tmp_path):
    rng = np.random.default_rng(0)
    video = rng.uniform(-1, 1, (1, 17, 3, 32, 48)).astype(np.float32)
    proc = VideoProcessor(str(tmp_path / "out"), name_suffix="t")
    first = proc.postprocess_video(video, output_file_name="a/b")
    second = proc.postprocess_video(video, output_file_name="a/b")
    assert first.parent == tmp_path / "out" and first.name == "a_b-t.mp4"
    assert second != first and second.exists(), "a second video must not overwrite the first"
    assert not list((tmp_path / "out").glob(".*partial*")), "no temporary file may remain"
    frames, fps = read_mp4(first)
    assert frames.shape == (17, 32, 48, 3) and fps == 25.0


BIG_PROCESS = """
import ctypes, sys
import numpy as np
from stepvideo.utils.video_process import read_mp4, write_mp4
libc = ctypes.CDLL(None)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
# Reserve (without touching) as much private memory as the machine has, like a MindSpore
# process with large pools: a plain fork of such a process fails with ENOMEM.
reserved = [libc.mmap(None, 2 << 30, 3, 0x22, -1, 0) for _ in range(16)]
frames = np.zeros((3, 16, 16, 3), np.uint8)
path = write_mp4(frames, sys.argv[1])
print(read_mp4(path)[0].shape)
"""


def test_mp4_io_works_from_a_process_with_huge_reserved_memory(tmp_path):
    import os
    import subprocess
    import sys

    from support import ROOT

    out = subprocess.run([sys.executable, "-c", BIG_PROCESS, str(tmp_path / "v.mp4")], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "(3, 16, 16, 3)"
