"""Decoded video -> uint8 frames -> mp4.

Clamp to [-1, 1], (x + 1) * 127.5, truncate to uint8, the batch stacked along the
height, a centre crop to the 540p standard (540x960 landscape, 960x540 portrait) when
the frame is at least that large, 25 fps libx264 with the `atadenoise` filter.

The file is written to a temporary name and renamed, so a crash never leaves a
half-written mp4 under the final name; its name is derived from the prompt, sanitised
(no path separators or control characters, bounded length) and made unique.
How this compares with the original: docs/porting.md.
"""
from __future__ import annotations

import datetime
import os
import re
import subprocess
import unicodedata
from pathlib import Path
from typing import Optional

import numpy as np

from stepvideo.utils.safetensors_io import atomic_path

FPS = 25
CODEC = "libx264"
CRF = "25"  # imageio's default quality 5, as the original wrote its videos
# The original's temporal denoise filter.
FFMPEG_PARAMS = ["-vf", "atadenoise=0a=0.1:0b=0.1:1a=0.1:1b=0.1"]
STANDARD_540P = (540, 960)  # (short side, long side)
MAX_NAME_CHARS = 50


def to_uint8_frames(video: np.ndarray) -> np.ndarray:
    """(b, frames, 3, H, W) floats in about [-1, 1] -> (frames, b*H, W, 3) uint8.

    The videos of a batch are stacked along the height, as the original does.
    """
    if video.ndim != 5 or video.shape[2] != 3:
        raise ValueError(f"video must be (b, frames, 3, H, W), got shape {video.shape}")
    x = (np.clip(video.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5
    x = np.clip(x, 0, 255).astype(np.uint8)  # truncation, like torch's .to(uint8)
    x = np.concatenate(list(x), axis=-2)  # (frames, 3, b*H, W)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def crop_to_540p(frames: np.ndarray) -> np.ndarray:
    """Centre crop (frames, H, W, 3) to 540x960 (landscape) or 960x540 (portrait) when large enough."""
    _, h, w, _ = frames.shape
    short, long = STANDARD_540P
    if w > h:
        ch, cw = short, long
    elif h > w:
        ch, cw = long, short
    else:
        return frames
    if h < ch or w < cw:
        return frames
    top, left = h // 2 - ch // 2, w // 2 - cw // 2
    return frames[:, top:top + ch, left:left + cw]


def safe_stem(text: str, max_chars: int = MAX_NAME_CHARS) -> str:
    """A file-name stem from free text: no separators, control or reserved characters."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(ch if (ch.isalnum() or ch in "-_ ") else " " for ch in text)
    text = re.sub(r"\s+", "_", text.strip())[:max_chars].strip("._-")
    return text or "video"


def _run_ffmpeg(args, stdin=None) -> subprocess.CompletedProcess:
    """Run the ffmpeg that imageio-ffmpeg ships (no system ffmpeg needed).

    Started in its own process group (as imageio-ffmpeg does, so Ctrl-C reaches only
    us) but through `process_group=0` rather than a `preexec_fn`: that lets Python
    use vfork, and a plain fork of a MindSpore process with many GB of reserved
    memory fails with ENOMEM under the kernel's overcommit heuristics.
    """
    import imageio_ffmpeg

    return subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", *args], input=stdin,
                          capture_output=True, process_group=0, check=False)


def write_mp4(frames: np.ndarray, path: os.PathLike | str, fps: int = FPS) -> Path:
    """Write uint8 frames (n, H, W, 3) atomically: temporary file in the same folder, then rename.

    The encoder settings are those imageio's writer used in the original (libx264,
    yuv420p, quality 5 = crf 25) plus the original's denoise filter.
    """
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be (n, H, W, 3) uint8 with n >= 1, got shape {frames.shape}")
    n, h, w, _ = frames.shape
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary (two jobs writing the same video never share one) that ffmpeg overwrites (-y).
    with atomic_path(path, suffix=f".partial{path.suffix}") as tmp:
        done = _run_ffmpeg(["-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{w}x{h}", "-pix_fmt", "rgb24",
                            "-r", str(fps), "-i", "-", "-an", "-vcodec", CODEC, "-pix_fmt", "yuv420p", "-crf", CRF,
                            "-v", "error", *FFMPEG_PARAMS, tmp], stdin=frames.tobytes())
        if done.returncode != 0:
            raise RuntimeError(f"ffmpeg could not write {path}: {done.stderr.decode(errors='replace').strip()}")
    return path


def read_mp4(path: os.PathLike | str) -> tuple[np.ndarray, float]:
    """Frames (n, H, W, 3) uint8 and fps of a video file (used by tests and the demo check)."""
    done = _run_ffmpeg(["-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-v", "info", "pipe:1"])
    info = done.stderr.decode(errors="replace")
    stream = re.search(r"Stream #\S+: Video: .*?, (\d+)x(\d+)[, ].*?, ([\d.]+) fps", info)
    if done.returncode != 0 or stream is None:
        raise RuntimeError(f"ffmpeg could not read {path}: {info.strip()[-500:]}")
    w, h, fps = int(stream.group(1)), int(stream.group(2)), float(stream.group(3))
    frames = np.frombuffer(done.stdout, np.uint8)
    return frames.reshape(-1, h, w, 3), fps


def video_frames(video: np.ndarray, crop2standard540p: bool = True) -> list:
    """(b, frames, 3, H, W) floats -> one (frames, H', W', 3) uint8 array per video, each cropped to 540p."""
    out = []
    for one in video:
        frames = to_uint8_frames(one[None])
        out.append(crop_to_540p(frames) if crop2standard540p else frames)
    return out


class VideoProcessor:
    """Post-processing and saving, with the original's constructor arguments."""

    # A video's files: the mp4 and, written before decoding, its latents.
    EXTENSIONS = ("mp4", "safetensors")

    def __init__(self, save_path: str = "./results", name_suffix: str = ""):
        self.save_path = Path(save_path)
        self.name_suffix = name_suffix

    def name_stamp(self) -> str:
        """The part after the prompt in file names: --name_suffix, or the date and time."""
        return safe_stem(self.name_suffix) if self.name_suffix else datetime.datetime.now().strftime("%Y%m%d-%H%M%S")

    def output_stem(self, output_file_name: str, stamp: Optional[str] = None) -> Path:
        """save_path/<name>-<stamp>[-n]: no file of that stem exists with any of `EXTENSIONS`."""
        stem = safe_stem(output_file_name)
        suffix = stamp or self.name_stamp()
        candidate = self.save_path / f"{stem}-{suffix}"
        n = 1
        while any(Path(f"{candidate}.{ext}").exists() for ext in self.EXTENSIONS):
            candidate = self.save_path / f"{stem}-{suffix}-{n}"
            n += 1
        return candidate

    def output_path(self, output_file_name: str, output_type: str = "mp4") -> Path:
        return Path(f"{self.output_stem(output_file_name)}.{output_type}")

    def postprocess_video(self, video: np.ndarray, output_file_name: str = "", output_type: str = "mp4",
                          crop2standard540p: bool = True) -> Path:
        """The original's call: the videos of a batch stacked along the height (each cropped on its own)."""
        frames = np.concatenate(video_frames(video, crop2standard540p), axis=1)
        path = write_mp4(frames, self.output_path(output_file_name, output_type))
        print(f"Saved the generated video in {path}", flush=True)
        return path
