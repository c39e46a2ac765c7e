"""What `run_parallel.py` does in each process of an msrun job (or alone, without msrun).

Order matters for failing fast:
1. flags, prompts, the transformer config and the parallel layout are checked
   before the process joins the job. msrun runs this script in its scheduler
   process too, and every process sees the same world size (MS_WORKER_NUM), so a
   bad layout stops every process at once with the list of possible layouts;
2. every process asks the services' /health (`check_services`): a missing, wrong
   or still-loading service stops the whole job within seconds, before any weight
   is loaded (--wait_services waits for loading ones);
3. the process joins the job, builds its stage of the DiT and loads only that
   stage's weights, once for all prompts;
4. per prompt, rank 0 alone talks to the caption encoder and broadcasts the
   embeddings (or the failure, so every rank goes on with the next prompt), and,
   for a Step-Video-TI2V checkpoint, to the VAE for the first image's latent;
   every rank runs the same denoising loop on identical latents;
5. rank 0 alone writes each video's latents, then decodes it into its own mp4; a
   failed decode keeps the latents and the job goes on; the summary at the end
   lists what was written where (`--decode_latents` decodes saved latents later).

Any exception prints `[rank r] error: ...` with the traceback and ends the
process at once with a non-zero code (without MindSpore's teardown, which would
wait for the other ranks); msrun then kills the other workers.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from stepvideo.checkpoint import CheckpointError, read_config

log = logging.getLogger("stepvideo.run_parallel")


class StartupError(ValueError):
    """Flags, model folder or layout that cannot work; reported without a traceback."""


def launched_by_msrun() -> bool:
    return os.environ.get("MS_ROLE") in ("MS_SCHED", "MS_WORKER")


def process_label() -> str:
    role = os.environ.get("MS_ROLE")
    if role == "MS_SCHED":
        return "scheduler"
    if role == "MS_WORKER":
        return f"rank {os.environ.get('RANK_ID', os.environ.get('MS_NODE_ID', '?'))}"
    return "main"


def check_startup(args: argparse.Namespace) -> dict:
    """Everything that can be checked before joining the job; returns the transformer config.

    The checkpoint's transformer config also decides text- or image-to-video (`apply_model_kind`).
    """
    from stepvideo.config import apply_model_kind
    from stepvideo.parallel.mesh import check_layout, split_layers

    if args.prompt is None and args.prompt_file is None:
        raise StartupError("--prompt is required (or --prompt_file FILE, one prompt per line)")
    if args.prompt is not None and args.prompt_file is not None:
        raise StartupError("give --prompt or --prompt_file, not both")
    read_prompts(args)
    if args.infer_steps < 1:
        raise StartupError(f"--infer_steps must be >= 1, got {args.infer_steps}")
    if args.offload == "blocks" and args.tensor_parallel_degree > 1:
        raise StartupError(f"--offload blocks streams whole blocks; --tensor_parallel_degree "
                           f"{args.tensor_parallel_degree} gives each rank slices: use one or the other")
    if args.latents_out and len(read_prompts(args)) > 1:
        raise StartupError("--latents_out holds one prompt's latents; with --prompt_file every video's latents "
                           "are written to --save_path anyway")
    if not args.wait_services >= 0:
        raise StartupError(f"--wait_services must be a number of seconds >= 0, got {args.wait_services}")
    try:
        config = read_config(Path(args.model_dir) / "transformer")
    except CheckpointError as e:
        raise StartupError(f"--model_dir {args.model_dir}: {e}") from None
    try:
        apply_model_kind(args, config)
    except ValueError as e:
        raise StartupError(f"--model_dir {args.model_dir}: {e}") from None
    world = int(os.environ.get("MS_WORKER_NUM", "1")) if launched_by_msrun() else 1
    try:
        check_layout(world, args.ulysses_degree, args.pp_degree, config["num_attention_heads"], config["num_layers"],
                     tp_degree=args.tensor_parallel_degree, cfg_degree=args.cfg_parallel_degree)
        split_layers(config["num_layers"], args.pp_degree, args.layer_split)
    except ValueError as e:
        hint = "" if launched_by_msrun() else " (run under msrun for more than one rank)"
        raise StartupError(f"{e}{hint}") from None
    return config


def read_prompts(args: argparse.Namespace) -> List[str]:
    """[--prompt], or the non-blank lines of --prompt_file."""
    if args.prompt_file is None:
        if not args.prompt.strip():
            raise StartupError("--prompt is empty")
        return [args.prompt]
    try:
        lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise StartupError(f"--prompt_file {args.prompt_file}: cannot read it as UTF-8 text: {e}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise StartupError(f"--prompt_file {args.prompt_file} holds no prompt (one prompt per line)")
    return prompts


def check_services(args: argparse.Namespace, text_encoder=None, video_decoder=None) -> None:
    """Ask the services this job will call for /health before anything is loaded.

    Every process of the job asks (a few small GETs), so a missing, wrong or
    still-loading service stops all of them within seconds, each with a non-zero
    exit code; rank 0 (or the single process) prints the full explanation.
    """
    from stepvideo.serving.health import ServicesNotReady, check_services as ask

    if args.local_models:
        return
    needed = {}
    if text_encoder is None and args.decode_latents is None:
        needed["caption"] = args.caption_url
    needs_vae = args.output_type == "mp4" or args.decode_latents is not None or args.first_image is not None
    if video_decoder is None and needs_vae:  # TI2V: the VAE also encodes the first image
        needed["vae"] = args.vae_url
    if not needed:
        return
    speaker = process_label() in ("main", "rank 0")
    try:
        ask(needed, args.model_dir, wait_seconds=args.wait_services,
            progress=(lambda line: print(f"[{process_label()}] {line}", flush=True)) if speaker else None)
    except ServicesNotReady as e:
        if speaker:
            raise StartupError(f"the services this job needs are not ready:\n{e}") from None
        raise StartupError(f"the services this job needs are not ready ({str(e).splitlines()[0]}; "
                           "rank 0 says what to do)") from None
    except ValueError as e:  # a URL that cannot be parsed
        raise StartupError(str(e)) from None


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, force=True, stream=sys.stdout,
                        format=f"[{process_label()}] %(asctime)s %(levelname)s %(name)s: %(message)s")


def run(args: argparse.Namespace, text_encoder=None, video_decoder=None):
    """One process's part of the job; returns the list of VideoFiles written on rank 0 (None elsewhere).

    text_encoder / video_decoder: objects with `encode(prompts)` / `decode(latents)` to use on
    rank 0 instead of the services or --local_models (tests pass fixed embeddings this way);
    for TI2V the video_decoder also encodes the first image (`encode(video, seed)`).
    Raises JobIncomplete on rank 0 after the summary if any prompt's videos were not written.
    """
    if args.decode_latents is not None:
        return decode_latents(args, video_decoder)
    config = check_startup(args)
    image_to_video = bool(config.get("use_additional_conditions", False))
    check_services(args, text_encoder, video_decoder)

    from stepvideo import backend

    device_id = int(os.environ["DEVICE_ID"]) if "DEVICE_ID" in os.environ else None
    backend.init(None if args.device == "auto" else args.device, device_id=device_id)
    _setup_logging()
    # A rank killed from outside (SIGKILL, the OOM killer) cannot say so; msrun reports its pid,
    # and this line lets scripts/run_parallel.sh name the rank.
    log.info("process id %d", os.getpid())

    from stepvideo.diffusion.video_pipeline import StepVideoPipeline
    from stepvideo.modules.model import StepVideoModel
    from stepvideo.parallel.collectives import init_process_group, make_collectives
    from stepvideo.parallel.mesh import Mesh
    from stepvideo.parallel.pipeline import DistributedDiT
    from stepvideo.parallel.image import BroadcastImageEncoding
    from stepvideo.parallel.text import BroadcastTextEncoding

    model_dir = Path(args.model_dir)
    if launched_by_msrun():
        joined = init_process_group()
        mesh = Mesh(rank=joined.rank, world_size=joined.world_size, ulysses_degree=args.ulysses_degree,
                    pp_degree=args.pp_degree, tp_degree=args.tensor_parallel_degree,
                    cfg_degree=args.cfg_parallel_degree)
        collectives = make_collectives(mesh)
        transformer = DistributedDiT.from_pretrained(model_dir / "transformer", mesh, collectives, args.layer_split,
                                                     offload=args.offload == "blocks")
        rank = mesh.rank
    elif args.offload == "blocks":
        from stepvideo.streaming import dit_streaming

        collectives = None
        transformer = StepVideoModel.from_config_dict(read_config(model_dir / "transformer"))
        report, streamer = dit_streaming(transformer, model_dir / "transformer", range(transformer.config.num_layers))
        transformer.set_train(False)
        log.info("DiT: %d resident tensors (%.1f MiB) loaded in %.1fs; %d blocks streamed from the mapped shards "
                 "(%.1f MiB, 2 slots of %.1f MiB)", report.tensors, report.bytes / 2**20, report.seconds,
                 len(streamer.order), streamer.mapped.nbytes() / 2**20, streamer.slot_bytes() / 2**20)
        rank = 0
    else:
        collectives = None
        transformer = StepVideoModel.from_pretrained(model_dir / "transformer")
        rank = 0

    transformer.set_jit(not args.eager)

    encoder = vae = None
    if rank == 0:
        encoder, vae = _encoders(args, text_encoder, video_decoder, image_to_video)
    decoder = vae if args.output_type != "latent" else None
    image_encoder = vae if image_to_video else None
    if collectives is not None:
        encoder = BroadcastTextEncoding(encoder, collectives, src=0)
        if image_to_video:
            image_encoder = BroadcastImageEncoding(image_encoder, collectives, src=0)

    pipeline = StepVideoPipeline.from_pretrained(model_dir, transformer=transformer, text_encoding=encoder,
                                                 video_decoding=decoder, save_path=args.save_path,
                                                 name_suffix=args.name_suffix, is_output_rank=rank == 0,
                                                 image_encoding=image_encoder)
    if image_to_video:
        log.info("image-to-video (Step-Video-TI2V) from %s, motion score %g", args.first_image, args.motion_score)
    outcomes = [_one_prompt(args, pipeline, prompt, rank) for prompt in read_prompts(args)]
    log.info("denoising: %.2f s per step", pipeline.seconds_per_step)
    if args.stats_dir and isinstance(transformer, DistributedDiT):
        _write_stats(Path(args.stats_dir), transformer, pipeline.seconds_per_step)
    if rank != 0:
        return None
    return _summary(outcomes, args)


class JobIncomplete(RuntimeError):
    """Some prompts' videos were not written (the summary says which and where their latents are)."""


@dataclass
class PromptOutcome:
    """What one prompt (or one --decode_latents file) gave: its VideoFiles, or why it gave none."""

    source: str  # "prompt '...'" or "latents FILE"
    files: list = field(default_factory=list)  # VideoFiles: written, or latents only (with the decode error)
    error: Optional[str] = None  # the prompt failed before any latents existed (text encoding)


def _one_prompt(args: argparse.Namespace, pipeline, prompt: str, rank: int) -> PromptOutcome:
    """Generate one prompt's videos; a failure of its caption or of its decoding is recorded, not raised."""
    from stepvideo.diffusion.video_pipeline import VideoOutputError
    from stepvideo.parallel.text import TextEncodingFailed
    from stepvideo.serving.client import ServiceError
    from stepvideo.utils import safetensors_io as st

    final = {}
    try:
        result = pipeline(prompt=prompt, num_frames=args.num_frames, height=args.height, width=args.width,
                          num_inference_steps=args.infer_steps, guidance_scale=args.cfg_scale,
                          time_shift=args.time_shift, pos_magic=args.pos_magic, neg_magic=args.neg_magic,
                          num_videos_per_prompt=args.num_videos, seed=args.seed, output_type=args.output_type,
                          output_file_name=prompt[:50], progress=rank == 0,
                          callback=lambda i, t: final.update(latents=t["latents"]),
                          first_image=args.first_image,  # None unless the checkpoint is TI2V (check_startup)
                          motion_score=args.motion_score if args.first_image is not None else None)
    except (TextEncodingFailed, ServiceError) as e:  # the caption service failed for this prompt
        log.error("prompt %r: text encoding failed: %s", prompt[:80], e)
        return PromptOutcome(f"prompt {prompt[:60]!r}", error=f"text encoding failed: {e}")
    except VideoOutputError as e:  # each failed video was logged with its latents file
        return PromptOutcome(f"prompt {prompt[:60]!r}", e.written + e.failed)
    if rank == 0 and args.latents_out:
        st.save_file(args.latents_out, {"latents": final["latents"].asnumpy().astype(np.float32)})
        log.info("latents written to %s", args.latents_out)
    return PromptOutcome(f"prompt {prompt[:60]!r}", result.files if rank == 0 else [])


def _summary(outcomes: List[PromptOutcome], args: argparse.Namespace) -> list:
    """Print what was written where; JobIncomplete if anything is missing."""
    files = [f for o in outcomes for f in o.files]
    lines = [f"summary: {sum(f.video is not None for f in files)} of {len(files)} video(s) written"]
    for o in outcomes:
        lines.append(f"  {o.source}:" + (f" FAILED: {o.error}" if o.error else ""))
        for f in o.files:
            lines.append(f"    {f.video}" if f.video else f"    not decoded; latents in {f.latents} ({f.error})")
    missing = [f for f in files if f.video is None]
    if missing:
        lines.append(f"decode the saved latents later with: python run_parallel.py --decode_latents "
                     f"{' '.join(str(f.latents) for f in missing)} --vae_url {args.vae_url}")
    print("\n".join(lines), flush=True)
    failed = sum(o.error is not None or any(f.video is None for f in o.files) for o in outcomes)
    if failed:
        raise JobIncomplete(f"{failed} of {len(outcomes)} prompt(s) did not give all their videos (see the summary)")
    return files


def decode_latents(args: argparse.Namespace, video_decoder=None) -> list:
    """--decode_latents FILE...: one mp4 per video of each latents file, beside it; no DiT, no msrun."""
    from stepvideo.diffusion.video_pipeline import VideoFile
    from stepvideo.utils import safetensors_io as st
    from stepvideo.utils.video_process import VideoProcessor, video_frames, write_mp4

    if launched_by_msrun():
        raise StartupError("--decode_latents runs in one plain process: start it with python, not msrun")
    paths = [Path(p) for p in args.decode_latents]
    for path in paths:
        if not path.is_file():
            raise StartupError(f"--decode_latents {path}: no such file")
    check_services(args, video_decoder=video_decoder)

    from stepvideo import backend

    backend.init(None if args.device == "auto" else args.device)
    _setup_logging()
    video_decoder = video_decoder or _video_decoder(args)
    outcomes = []
    for path in paths:
        outcome = PromptOutcome(f"latents {path}")
        try:
            latents = st.load_file(path)["latents"]
            for i in range(latents.shape[0]):
                (frames,) = video_frames(video_decoder.decode(latents[i:i + 1]))
                name = path.stem if latents.shape[0] == 1 else f"{path.stem}_v{i}"
                target = path.with_name(f"{name}.mp4")  # where the job would have written it
                if target.exists():
                    target = VideoProcessor(str(path.parent), name_suffix="decoded").output_path(name)
                outcome.files.append(VideoFile(outcome.source, path, video=write_mp4(frames, target)))
                log.info("video written to %s", outcome.files[-1].video)
        except Exception as e:  # noqa: BLE001 - report it in the summary and go on with the next file
            log.error("%s: decoding or writing failed: %s: %s", path, type(e).__name__, e)
            outcome.files.append(VideoFile(outcome.source, path, error=f"{type(e).__name__}: {e}"))
        outcomes.append(outcome)
    return _summary(outcomes, args)


def _encoders(args, text_encoder, video_decoder, image_to_video: bool = False):
    """The caption encoder and the VAE of rank 0: given, in-process (--local_models) or remote.

    The VAE decodes the video (unless --output_type latent) and, for TI2V, encodes the first image.
    """
    if text_encoder is None:
        if args.local_models:
            from stepvideo.diffusion.interfaces import LocalCaption

            text_encoder = LocalCaption.from_model_dir(args.model_dir, offload=args.offload == "blocks")
        else:
            from stepvideo.serving.client import RemoteCaption

            text_encoder = RemoteCaption(args.caption_url)
    if args.output_type == "latent" and not image_to_video:
        return text_encoder, None
    return text_encoder, video_decoder or _video_decoder(args)


def _video_decoder(args):
    """The VAE: in-process (--local_models) or the service at --vae_url."""
    if args.local_models:
        from stepvideo.diffusion.interfaces import LocalVae

        return LocalVae.from_model_dir(args.model_dir)
    from stepvideo.serving.client import RemoteVae

    return RemoteVae(args.vae_url)


def _write_stats(folder: Path, dit, seconds_per_step: float) -> None:
    """rank<r>.json: the rank's place, its weights and memory, idle time and per-step traffic."""
    folder.mkdir(parents=True, exist_ok=True)
    mesh, plan = dit.mesh, dit.plan
    stats = {
        "rank": mesh.rank, "stage": mesh.stage, "cfg_rank": mesh.cfg_rank, "tp_rank": mesh.tp_rank,
        "sp_rank": mesh.sp_rank, "ulysses_degree": mesh.ulysses_degree, "pp_degree": mesh.pp_degree,
        "tp_degree": mesh.tp_degree, "cfg_degree": mesh.cfg_degree, "compiled": dit.model.jit_enabled,
        "blocks": [plan.blocks.start, plan.blocks.stop], "first": plan.first, "last": plan.last,
        "holds": plan.describe(), "load": dit.load_report, "timing": dit.timing.as_dict(),
        "streaming": dit.streamer.stats.as_dict() if dit.streamer else None,
        "seconds_per_step": seconds_per_step,
        "traffic_last_step": {op: {"calls": s.calls, "bytes": s.bytes, "seconds": s.seconds}
                              for op, s in dit.last_traffic.items()},
    }
    (folder / f"rank{mesh.rank}.json").write_text(json.dumps(stats, indent=2) + "\n")


def _die(message: str, code: int) -> int:
    print("\n" + message, file=sys.stderr, flush=True)  # on its own line, after any progress bar
    sys.stdout.flush()
    if launched_by_msrun():
        # MindSpore's teardown waits for the other ranks; leave now so msrun sees the failure.
        os._exit(code)
    return code


def main(argv: Optional[Sequence[str]] = None, **run_kwargs) -> int:
    """Parse flags and run; 0 on success, 2 for a start-up error, 1 for any other failure."""
    from stepvideo.config import parse_args

    args = parse_args(argv)
    try:
        run(args, **run_kwargs)
    except StartupError as e:
        return _die(f"[{process_label()}] error: {e}", 2)
    except JobIncomplete as e:
        return _die(f"[{process_label()}] error: {e}", 1)
    except Exception:
        return _die(f"[{process_label()}] error:\n{traceback.format_exc()}", 1)
    return 0
