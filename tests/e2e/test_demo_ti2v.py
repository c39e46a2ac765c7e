"""scripts/demo.sh --image PATH: image-to-video end to end on the tiny TI2V checkpoint.

Real everything, as the text-to-video demo: the checkpoint writer (--ti2v), convert.py, the caption and
VAE services on loopback (the VAE encodes the first image over HTTP), msrun with 4 workers (Ulysses 2 x
pipeline 2, rank 0 broadcasting the image latent), ffmpeg; the mp4 is read back.
"""
import re

import numpy as np
import pytest
from PIL import Image

from stepvideo.utils.video_process import read_mp4


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_with_an_image_produces_a_readable_mp4(tmp_path, run_demo):
    image = tmp_path / "first frame.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8)).save(image)
    run_demo("tiny-ti2v", "--image", str(image), "A cat smiles")

    config = (tmp_path / "tiny-ti2v" / "transformer" / "config.json").read_text()
    assert '"use_additional_conditions": true' in config
    videos = list((tmp_path / "results").glob("*.mp4"))
    assert len(videos) == 1 and videos[0].name.startswith("A_cat_smiles"), videos
    frames, fps = read_mp4(videos[0])
    assert frames.shape == (34, 128, 224, 3) and fps == 25.0
    worker0 = (tmp_path / "logs" / "msrun" / "worker_0.log").read_text(errors="replace")
    assert f"image-to-video (Step-Video-TI2V) from {image}, motion score 5" in worker0
    # rank 0 asked the VAE service over HTTP and broadcast the latent; other ranks only received it
    assert re.search(r"first image \(224x128\) encoded to a latent of shape \(1, 1, 64, 8, 14\) by "
                     r"BroadcastImageEncoding\(src=0, encoder=RemoteVae\('http://127\.0\.0\.1:\d+/vae-api'\)\)",
                     worker0), worker0[-3000:]
    worker3 = (tmp_path / "logs" / "msrun" / "worker_3.log").read_text(errors="replace")
    assert "encoder=None" in worker3
