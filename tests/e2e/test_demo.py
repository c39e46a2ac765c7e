"""The README's main command, end to end: scripts/demo.sh on the tiny checkpoint.

Real everything: the checkpoint writer, convert.py, two service processes on loopback, msrun with
4 workers (Ulysses 2 x pipeline 2), the HTTP calls, ffmpeg; the mp4 is read back.
"""
import os
import re
import time

import pytest

from stepvideo.utils.video_process import read_mp4


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_script_produces_a_readable_mp4(tmp_path, run_demo):
    proc = run_demo("tiny", "A red car drives through a library")

    videos = list((tmp_path / "results").glob("*.mp4"))
    assert len(videos) == 1, videos
    assert videos[0].name.startswith("A_red_car_drives_through_a_library")
    frames, fps = read_mp4(videos[0])
    assert frames.shape == (34, 128, 224, 3) and fps == 25.0
    assert f"The video is at {videos[0]}" in proc.stdout

    # the services were stopped when the script ended
    logs = (tmp_path / "logs" / "services")
    for log in ("caption.log", "vae.log"):
        assert (logs / log).is_file()
    pids = [int(p) for p in re.findall(r"started the \w+ service \(pid (\d+)", proc.stderr)]
    assert len(pids) == 2, proc.stderr[-2000:]
    deadline = time.time() + 10
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "the demo left its services running"
