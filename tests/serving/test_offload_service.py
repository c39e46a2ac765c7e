"""The caption service with --offload blocks: Step-LLM's layers streamed, the same answers bit for bit.

A real caption-only service process on loopback streams the (golden) Step-LLM's layers from
the mapped checkpoint; its answers must equal the resident model run in this process.
"""
from __future__ import annotations

from stepvideo.diffusion.interfaces import LocalCaption
from stepvideo.serving.client import RemoteCaption

PROMPTS = [["A cat walks on the grass, realistic style.", ""], ["一名宇航员在月球上发现一块石碑"]]


def test_caption_service_streaming_step_llm_layers(start_service, tiny_model_dir):
    proc = start_service(["--model_dir", str(tiny_model_dir), "--enable_llm", "True", "--enable_vae", "False",
                          "--port", "0", "--offload", "blocks"])
    url = proc.wait_ready()["caption_url"]
    local = LocalCaption.from_model_dir(tiny_model_dir)
    with RemoteCaption(url) as remote:
        for prompts in PROMPTS:
            got, want = remote.encode(prompts), local.encode(prompts)
            for name in ("y", "y_mask", "clip_embedding"):
                a, b = getattr(got, name), getattr(want, name)
                assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), (prompts, name)
    assert "layers streamed" in proc.log()
