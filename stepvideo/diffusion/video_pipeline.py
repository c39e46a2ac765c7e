"""`StepVideoPipeline`: prompt -> text embeddings -> denoising loop -> video.

The loop: the prompts sent to the text encoders are `[prompt + pos_magic, neg_magic]`;
the latent is duplicated for classifier-free guidance with the conditional half first;
every batch row gets the timestep; `guided = uncond + scale * (cond - uncond)`; the
scheduler steps in fp32. `guidance_scale <= 1` runs without guidance (one batch row per
video). `prompt` is a string or a non-empty list (`stepvideo.contracts`), each giving
`num_videos_per_prompt` videos.

Text encoding and decoding go through two small interfaces (`encode(prompts)` and
`decode(latents)`, `stepvideo.diffusion.interfaces`) with an in-process implementation
there and a remote one in `stepvideo.serving.client`.

Image-to-video (Step-Video-TI2V: a transformer with `use_additional_conditions`):
`first_image` is resized to cover the video size and centre-cropped (`image_condition.py`),
encoded by the VAE (`image_encoding.encode(video, seed)`, noise from the job's seed), rounded
to bf16 values, and the condition latent (the image latent in frame 0, zeros after, one row
per DiT batch row) goes to every DiT call with `motion_score` (default 2.0).

Sizes: frames are rounded down to a multiple of 17 and height/width to multiples of 16,
with a warning when the values change. Initial noise is drawn with numpy from the
seed/generator (the same on every device) and rounded to bf16 values; given latents are
rounded to bf16 values and define the video size. Bad arguments raise ValueError before
any model work. Output: one mp4 per video (prompts x num_videos_per_prompt), each cropped
to 540p on its own, and each video's final latents written beside it before it is
decoded, so a failed decode loses nothing. How this compares with the original:
docs/porting.md.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor
from tqdm import tqdm

from stepvideo import dtypes
from stepvideo.contracts import check_latent_shape, check_prompts
from stepvideo.diffusion import image_condition
from stepvideo.diffusion.scheduler import FlowMatchDiscreteScheduler
from stepvideo.modules.model import StepVideoModel
from stepvideo.utils import safetensors_io as st
from stepvideo.utils.video_process import MAX_NAME_CHARS, VideoProcessor, safe_stem, video_frames, write_mp4

log = logging.getLogger(__name__)

FRAMES_PER_CHUNK = 17  # video frames decoded from one chunk of latents
LATENTS_PER_CHUNK = 3
SPATIAL_COMPRESSION = 16
OUTPUT_TYPES = ("mp4", "latent", "np")
# The originals' `StepVideoPipeline.__call__` defaults where the two differ: Step-Video-T2V generates 204
# frames, Step-Video-TI2V 102 with motion score 2.0 (its run_parallel's flags default to 5: stepvideo/config.py).
T2V_NUM_FRAMES = 204
TI2V_NUM_FRAMES = 102
TI2V_MOTION_SCORE = 2.0


@dataclass(frozen=True)
class VideoFile:
    """One video of a call: its latents (always written first) and its mp4, or why decoding failed."""

    prompt: str
    latents: Path
    video: Optional[Path] = None
    error: Optional[str] = None


@dataclass
class StepVideoPipelineOutput:
    video: Any  # mp4: the list of mp4 paths, one per video; "latent" / "np": an array
    files: List[VideoFile] = field(default_factory=list)  # mp4: each video's files


class VideoOutputError(RuntimeError):
    """Some videos could not be decoded or written; their latents are on disk.

    written / failed: the VideoFiles of the call; decode a failed one later with
    `python run_parallel.py --decode_latents FILE --vae_url URL`.
    """

    def __init__(self, written: List[VideoFile], failed: List[VideoFile]):
        self.written, self.failed = written, failed
        lines = [f"{len(failed)} of {len(written) + len(failed)} video(s) could not be decoded or written; "
                 "their latents are saved:"]
        lines += [f"  {f.latents}: {f.error}" for f in failed]
        lines.append("decode them later with: python run_parallel.py --decode_latents FILE --vae_url URL")
        super().__init__("\n".join(lines))


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 values rounded to the nearest bf16 value (kept in fp32)."""
    return dtypes.bf16_bits_to_f32(dtypes.f32_to_bf16_bits(x))


def latent_shape(batch: int, num_frames: int, height: int, width: int, channels: int) -> tuple:
    """(b, frames // 17 * 3, c, h/16, w/16) for already-rounded sizes, as the original."""
    return (batch, max(num_frames // FRAMES_PER_CHUNK * LATENTS_PER_CHUNK, 1), channels,
            height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _as_tensor(x, dtype: ms.dtype) -> Tensor:
    """A caption/latent array (numpy fp32, or a Tensor) as a Tensor of `dtype`."""
    t = x if isinstance(x, Tensor) else Tensor.from_numpy(np.ascontiguousarray(x))
    return t.astype(dtype) if t.dtype != dtype else t


class StepVideoPipeline:
    """Text-to-video generation with Step-Video-T2V.

    transformer: a `StepVideoModel`, or a wrapper with the same call signature
        (the distributed DiT); scheduler: `FlowMatchDiscreteScheduler`;
    text_encoding / video_decoding: objects with `encode(prompts)` and
        `decode(latents)` (remote or in-process; set them with `setup_api` or
        `setup_local`); image_encoding: `encode(video, seed)` for TI2V's first
        image (the VAE; `setup_api`/`setup_local` set it too); is_output_rank:
        only this rank decodes and writes video.
    """

    def __init__(self, transformer, scheduler: FlowMatchDiscreteScheduler, text_encoding=None,
                 video_decoding=None, save_path: str = "./results", name_suffix: str = "",
                 is_output_rank: bool = True, image_encoding=None):
        self.transformer = transformer
        self.scheduler = scheduler
        self.text_encoding = text_encoding
        self.video_decoding = video_decoding
        self.image_encoding = image_encoding
        self.video_processor = VideoProcessor(save_path, name_suffix)
        self.is_output_rank = is_output_rank

    @classmethod
    def from_pretrained(cls, model_dir: Union[str, os.PathLike], transformer=None, **kwargs) -> "StepVideoPipeline":
        """Read `model_index.json`, `transformer/` and `scheduler/` from the model folder.

        `transformer` may be given (e.g. a distributed wrapper that loaded only its stage).
        """
        model_dir = Path(model_dir)
        index = model_dir / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{index} not found: expected a Step-Video model folder with model_index.json, "
                                    "transformer/ and scheduler/")
        components = json.loads(index.read_text())
        for name in ("transformer", "scheduler"):
            if name not in components:
                raise ValueError(f"{index} lists no {name!r} component")
        if transformer is None:
            transformer = StepVideoModel.from_pretrained(model_dir / "transformer")
        scheduler = FlowMatchDiscreteScheduler.from_pretrained(model_dir / "scheduler")
        return cls(transformer, scheduler, **kwargs)

    def setup_api(self, vae_url: str, caption_url: str, **client_kwargs) -> "StepVideoPipeline":
        """Use the remote caption and VAE services (the original deployment)."""
        from stepvideo.serving.client import RemoteCaption, RemoteVae

        self.text_encoding = RemoteCaption(caption_url, **client_kwargs)
        self.video_decoding = RemoteVae(vae_url, **client_kwargs)
        self.image_encoding = self.video_decoding  # TI2V: the VAE service also encodes the first image
        return self

    def setup_local(self, model_dir: Union[str, os.PathLike], text: bool = True,
                    vae: bool = True) -> "StepVideoPipeline":
        """Load the text encoders and/or the VAE from `model_dir` into this process (single machine)."""
        from stepvideo.diffusion.interfaces import LocalCaption, LocalVae

        if text:
            self.text_encoding = LocalCaption.from_model_dir(model_dir)
        if vae:
            self.video_decoding = self.image_encoding = LocalVae.from_model_dir(model_dir)
        return self

    # ------------------------------------------------------------------ checks

    @staticmethod
    def check_inputs(num_frames: int, width: int, height: int):
        """Frames rounded down to a multiple of 17, height and width to multiples of 16; warns when they change."""
        frames = max(num_frames // FRAMES_PER_CHUNK * FRAMES_PER_CHUNK, 1)
        w = max(width // SPATIAL_COMPRESSION * SPATIAL_COMPRESSION, SPATIAL_COMPRESSION)
        h = max(height // SPATIAL_COMPRESSION * SPATIAL_COMPRESSION, SPATIAL_COMPRESSION)
        if (frames, w, h) != (num_frames, width, height):
            log.warning("adjusted the video size from %d frames %dx%d (HxW) to %d frames %dx%d: frames are rounded "
                        "down to a multiple of 17 and sizes to multiples of 16", num_frames, height, width,
                        frames, h, w)
        return frames, w, h

    # ------------------------------------------------------------------ pieces

    def encode_prompt(self, prompts: Sequence[str], neg_magic: str = "", pos_magic: str = "",
                      num_videos_per_prompt: int = 1, do_classifier_free_guidance: bool = True):
        """-> (prompt_embeds, clip_embedding, attention_mask) with rows [cond..., uncond...].

        Each prompt's row is repeated num_videos_per_prompt times; the negative rows follow.
        """
        texts = [p + pos_magic for p in prompts] + ([neg_magic] if do_classifier_free_guidance else [])
        out = self.text_encoding.encode(texts)
        rows = [i for i in range(len(prompts)) for _ in range(num_videos_per_prompt)]
        if do_classifier_free_guidance:
            rows += [len(prompts)] * len(rows)
        rows = np.asarray(rows)
        dtype = self.transformer.dtype
        take = lambda a: _as_tensor(np.asarray(a)[rows] if not isinstance(a, Tensor) else a[Tensor(rows)], dtype)
        return take(out.y), take(out.clip_embedding), take(out.y_mask)

    def prepare_latents(self, shape: tuple, seed: Optional[int] = None,
                        generator: Optional[np.random.Generator] = None,
                        latents: Optional[np.ndarray] = None) -> np.ndarray:
        """Initial noise of `shape` (b, T, c, h, w), fp32 holding bf16 values; given `latents` (same b and c) win."""
        if latents is not None:
            latents = np.asarray(latents.asnumpy() if isinstance(latents, Tensor) else latents, np.float32)
            check_latent_shape(latents.shape, shape[2], batch=shape[0])
            if latents.shape != tuple(shape):
                # Given latents define the video size.
                log.info("using the given latents of shape %s instead of %s from num_frames/height/width",
                         latents.shape, tuple(shape))
            return round_to_bf16(latents)
        if generator is None:
            generator = np.random.default_rng(seed)
        return round_to_bf16(generator.standard_normal(shape, dtype=np.float32))

    def decode_vae(self, latents: np.ndarray) -> np.ndarray:
        return self.video_decoding.decode(latents)

    @property
    def is_image_to_video(self) -> bool:
        """A Step-Video-TI2V transformer (condition latent + motion score)."""
        return bool(self.transformer.config.use_additional_conditions)

    def prepare_image(self, first_image, height: int, width: int) -> Optional[np.ndarray]:
        """TI2V: the first image resized and centre-cropped to the video, (1, 1, 3, height, width) in [-1, 1].

        None for a text-to-video model; an image for the wrong kind of model is an error.
        """
        if not self.is_image_to_video:
            if first_image is not None:
                raise ValueError("first_image: this is a text-to-video checkpoint (its transformer config has "
                                 "use_additional_conditions false); image-to-video needs a Step-Video-TI2V "
                                 "checkpoint")
            return None
        if first_image is None:
            raise ValueError("first_image: this is an image-to-video (Step-Video-TI2V) checkpoint; give the first "
                             "frame as a path, a PIL image or an array")
        image = image_condition.load_image(first_image)
        return image_condition.resize_and_crop(image, height, width)[None, None]

    def prepare_condition(self, image: np.ndarray, shape: tuple, rows: int, seed: int) -> Tensor:
        """TI2V: encode the prepared image (VAE posterior sample, noise from `seed`) -> (rows, f, c, h, w).

        The image latent is rounded to bf16 values, as the condition is in the DiT's bf16 (docs/porting.md).
        """
        if self.image_encoding is None:
            raise ValueError("no VAE to encode first_image: call setup_api(vae_url, caption_url) or give "
                             "image_encoding")
        latent = np.asarray(self.image_encoding.encode(image, seed=seed), np.float32)
        log.info("first image (%dx%d) encoded to a latent of shape %s by %r", image.shape[-1], image.shape[-2],
                 latent.shape, self.image_encoding)
        _, frames, c, h, w = shape
        if latent.shape != (1, 1, c, h, w):
            raise ValueError(f"the VAE encoded the first image to shape {latent.shape}; the DiT needs "
                             f"(1, 1, {c}, {h}, {w}) for latents of shape {tuple(shape)}")
        return Tensor.from_numpy(round_to_bf16(image_condition.condition_latents(latent, rows, frames)))

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: Union[str, List[str]] = None, height: int = 544, width: int = 992,
                 num_frames: Optional[int] = None, num_inference_steps: int = 50, guidance_scale: float = 9.0,
                 time_shift: float = 13.0, neg_magic: str = "", pos_magic: str = "",
                 num_videos_per_prompt: int = 1, seed: Optional[int] = None,
                 generator: Optional[np.random.Generator] = None, latents: Optional[np.ndarray] = None,
                 output_type: str = "mp4", output_file_name: str = "", return_dict: bool = True,
                 progress: bool = True, callback: Optional[Callable[[int, Dict[str, Tensor]], None]] = None,
                 first_image: Optional[image_condition.ImageInput] = None, motion_score: Optional[float] = None):
        """Generate; on the output rank returns the mp4 paths, one per video (or an array for "latent"/"np").

        mp4: each video's final latents are written to save_path before it is decoded (see
        `write_videos`); a failed decode raises VideoOutputError naming them, after the other videos.

        callback(i, tensors) is called after each step with "model_input", "timestep",
        "noise_pred" (guided) and "latents" (after the scheduler step), and for TI2V
        "condition" (the condition latent given to the DiT).
        first_image / motion_score: image-to-video with a TI2V checkpoint (required there,
        refused otherwise); motion_score defaults to the original TI2V pipeline's 2.0.
        num_frames: None takes the original pipeline's default for the checkpoint's kind: 204 for
        text-to-video, 102 for image-to-video.
        """
        # 1. Check everything before any model work.
        prompts = check_prompts(prompt, "prompt")
        height = _positive_int("height", height)
        width = _positive_int("width", width)
        if num_frames is None:
            num_frames = TI2V_NUM_FRAMES if self.is_image_to_video else T2V_NUM_FRAMES
        num_frames = _positive_int("num_frames", num_frames)
        num_inference_steps = _positive_int("num_inference_steps", num_inference_steps)
        num_videos_per_prompt = _positive_int("num_videos_per_prompt", num_videos_per_prompt)
        if not isinstance(guidance_scale, (int, float)) or not np.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type != "latent" and self.is_output_rank and self.video_decoding is None:
            raise ValueError("no VAE: call setup_api(vae_url, caption_url) or give video_decoding, "
                             "or use output_type='latent'")
        if self.text_encoding is None:
            raise ValueError("no text encoder: call setup_api(vae_url, caption_url) or give text_encoding")
        num_frames, width, height = self.check_inputs(num_frames, width, height)
        image = self.prepare_image(first_image, height, width)
        if image is None and motion_score is not None:
            raise ValueError("motion_score: only an image-to-video (Step-Video-TI2V) checkpoint takes it")
        motion_score = TI2V_MOTION_SCORE if image is not None and motion_score is None else motion_score
        if image is not None and (isinstance(motion_score, bool) or not isinstance(motion_score, (int, float))
                                  or not np.isfinite(motion_score)):
            raise ValueError(f"motion_score must be a finite number, got {motion_score!r}")
        do_cfg = guidance_scale > 1.0
        batch = len(prompts) * num_videos_per_prompt
        shape = latent_shape(batch, num_frames, height, width, self.transformer.config.in_channels)

        # 2. Text embeddings, in the transformer's dtype.
        prompt_embeds, clip_embedding, attention_mask = self.encode_prompt(
            prompts, neg_magic, pos_magic, num_videos_per_prompt, do_cfg)

        # 3. Timesteps and 4. noise.
        self.scheduler.set_timesteps(num_inference_steps=num_inference_steps, time_shift=time_shift)
        if generator is None:
            generator = np.random.default_rng(seed)
        latents = Tensor.from_numpy(self.prepare_latents(shape, generator=generator, latents=latents))
        conditions = {}
        if image is not None:
            # The image's posterior noise comes from the same generator, after the latents.
            condition = self.prepare_condition(image, tuple(latents.shape), 2 * batch if do_cfg else batch,
                                               seed=int(generator.integers(2**31)))
            conditions = {"condition_hidden_states": condition.astype(self.transformer.dtype),
                          "motion_score": float(motion_score)}

        # 5. Denoising loop.
        dtype = self.transformer.dtype
        started = time.perf_counter()
        steps = tqdm(self.scheduler.timesteps, total=num_inference_steps, unit="step", disable=not progress,
                     desc="denoising")
        for i, t in enumerate(steps):
            model_input = ms.ops.cat((latents, latents), 0) if do_cfg else latents
            model_input = model_input.astype(dtype)
            timestep = Tensor(np.full((model_input.shape[0],), float(t), np.float32)).astype(dtype)
            noise_pred = self.transformer(hidden_states=model_input, timestep=timestep,
                                          encoder_hidden_states=prompt_embeds,
                                          encoder_attention_mask=attention_mask,
                                          encoder_hidden_states_2=clip_embedding, return_dict=False,
                                          **conditions)
            if do_cfg:
                cond, uncond = noise_pred[:batch], noise_pred[batch:]
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(model_output=noise_pred, timestep=t, sample=latents)
            if callback is not None:
                extra = {"condition": conditions["condition_hidden_states"]} if conditions else {}
                callback(i, {"model_input": model_input, "timestep": timestep, "noise_pred": noise_pred,
                             "latents": latents, **extra})
        self.seconds_per_step = (time.perf_counter() - started) / num_inference_steps

        # 6. Output (only the output rank decodes and writes).
        if not self.is_output_rank:
            return None
        result = latents.asnumpy()
        if output_type == "mp4":
            names = [output_file_name or prompts[i // num_videos_per_prompt][:50] for i in range(batch)]
            files = self.write_videos(result, names, [prompts[i // num_videos_per_prompt] for i in range(batch)],
                                      num_videos_per_prompt)
            return StepVideoPipelineOutput(video=[str(f.video) for f in files], files=files) if return_dict \
                else ([str(f.video) for f in files],)
        if output_type == "np":
            result = np.concatenate(video_frames(self.decode_vae(result)), axis=1)
        return StepVideoPipelineOutput(video=result) if return_dict else (result,)

    def write_videos(self, latents: np.ndarray, names: Sequence[str], prompts: Sequence[str],
                     videos_per_prompt: int = 1) -> List[VideoFile]:
        """One mp4 per video of `latents` (b, T, c, h, w), each cropped to 540p on its own.

        Each video's latents are written first (`<name>.safetensors` beside `<name>.mp4`),
        then it is decoded alone, so a failed decode loses nothing and does not stop the
        other videos. Raises VideoOutputError after the last video if any failed.
        """
        written, failed = [], []
        stamp = self.video_processor.name_stamp()  # one for all videos of the call
        for i, (name, prompt) in enumerate(zip(names, prompts)):
            if videos_per_prompt > 1:  # the index must survive the name's length limit
                index = f"_v{i % videos_per_prompt}"
                name = safe_stem(name, MAX_NAME_CHARS - len(index)) + index
            stem = self.video_processor.output_stem(name, stamp)
            latents_path = Path(f"{stem}.safetensors")
            latents_path.parent.mkdir(parents=True, exist_ok=True)
            st.save_file(latents_path, {"latents": np.ascontiguousarray(latents[i:i + 1], np.float32)},
                         metadata={"prompt": prompt, "format": "step-video latents (b, T, c, h, w)"})
            try:
                (frames,) = video_frames(self.decode_vae(latents[i:i + 1]))
                video_path = write_mp4(frames, f"{stem}.mp4")
            except Exception as e:  # noqa: BLE001 - any failure: keep the latents, go on with the next video
                log.error("video %d (%s): decoding or writing failed: %s: %s; its latents are in %s", i, name,
                          type(e).__name__, e, latents_path)
                failed.append(VideoFile(prompt, latents_path, error=f"{type(e).__name__}: {e}"))
                continue
            log.info("video written to %s (latents in %s)", video_path, latents_path)
            written.append(VideoFile(prompt, latents_path, video=video_path))
        if failed:
            raise VideoOutputError(written, failed)
        return written
