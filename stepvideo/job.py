"""What `run_parallel.py` does in each process of an msrun job (or alone, without msrun).

Order matters for failing fast:
1. flags, the transformer config and the parallel layout are checked before the
   process joins the job. msrun runs this script in its scheduler process too,
   and every process sees the same world size (MS_WORKER_NUM), so a bad layout
   stops every process at once with the list of possible layouts;
2. the process joins the job, builds its stage of the DiT and loads only that
   stage's weights;
3. rank 0 alone talks to the caption encoder and broadcasts the embeddings;
   every rank runs the same denoising loop on identical latents;
4. rank 0 alone decodes and writes the video (and the latents if asked).

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
from pathlib import Path
from typing import Optional, Sequence

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
    """Everything that can be checked before joining the job; returns the transformer config."""
    from stepvideo.parallel.mesh import check_layout, split_layers

    if not args.prompt:
        raise StartupError("--prompt is required")
    if args.infer_steps < 1:
        raise StartupError(f"--infer_steps must be >= 1, got {args.infer_steps}")
    try:
        config = read_config(Path(args.model_dir) / "transformer")
    except CheckpointError as e:
        raise StartupError(f"--model_dir {args.model_dir}: {e}") from None
    world = int(os.environ.get("MS_WORKER_NUM", "1")) if launched_by_msrun() else 1
    try:
        check_layout(world, args.ulysses_degree, args.pp_degree, config["num_attention_heads"], config["num_layers"])
        split_layers(config["num_layers"], args.pp_degree, args.layer_split)
    except ValueError as e:
        hint = "" if launched_by_msrun() else " (run under msrun for more than one rank)"
        raise StartupError(f"{e}{hint}") from None
    return config


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, force=True, stream=sys.stdout,
                        format=f"[{process_label()}] %(asctime)s %(levelname)s %(name)s: %(message)s")


def run(args: argparse.Namespace, text_encoder=None, video_decoder=None):
    """One process's part of the job; returns the pipeline's result on rank 0 (None elsewhere).

    text_encoder / video_decoder: objects with `encode(prompts)` / `decode(latents)` to use on
    rank 0 instead of the services or --local_models (tests pass fixed embeddings this way).
    """
    check_startup(args)

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
    from stepvideo.parallel.text import BroadcastTextEncoding
    from stepvideo.utils import safetensors_io as st

    model_dir = Path(args.model_dir)
    if launched_by_msrun():
        joined = init_process_group()
        mesh = Mesh(rank=joined.rank, world_size=joined.world_size, ulysses_degree=args.ulysses_degree,
                    pp_degree=args.pp_degree)
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

    encoder = decoder = None
    if rank == 0:
        encoder, decoder = _encoders(args, text_encoder, video_decoder)
    if collectives is not None:
        encoder = BroadcastTextEncoding(encoder, collectives, src=0)

    pipeline = StepVideoPipeline.from_pretrained(model_dir, transformer=transformer, text_encoding=encoder,
                                                 video_decoding=decoder, save_path=args.save_path,
                                                 name_suffix=args.name_suffix, is_output_rank=rank == 0)
    final = {}
    result = pipeline(prompt=args.prompt, num_frames=args.num_frames, height=args.height, width=args.width,
                      num_inference_steps=args.infer_steps, guidance_scale=args.cfg_scale,
                      time_shift=args.time_shift, pos_magic=args.pos_magic, neg_magic=args.neg_magic,
                      num_videos_per_prompt=args.num_videos, seed=args.seed, output_type=args.output_type,
                      output_file_name=args.prompt[:50], progress=rank == 0,
                      callback=lambda i, t: final.update(latents=t["latents"]))
    log.info("denoising: %.2f s per step", pipeline.seconds_per_step)

    if rank == 0:
        if args.latents_out:
            st.save_file(args.latents_out, {"latents": final["latents"].asnumpy().astype(np.float32)})
            log.info("latents written to %s", args.latents_out)
        if args.output_type == "mp4":
            log.info("video written to %s", result.video)
    if args.stats_dir and isinstance(transformer, DistributedDiT):
        _write_stats(Path(args.stats_dir), transformer, pipeline.seconds_per_step)
    return result if rank == 0 else None


def _encoders(args, text_encoder, video_decoder):
    """The caption encoder and the VAE of rank 0: given, in-process (--local_models) or remote."""
    need_vae = args.output_type != "latent"
    if args.local_models:
        from stepvideo.diffusion.interfaces import LocalCaption, LocalVae

        text_encoder = text_encoder or LocalCaption.from_model_dir(args.model_dir, offload=args.offload == "blocks")
        if need_vae:
            video_decoder = video_decoder or LocalVae.from_model_dir(args.model_dir)
    else:
        from stepvideo.serving.client import RemoteCaption, RemoteVae

        text_encoder = text_encoder or RemoteCaption(args.caption_url)
        if need_vae:
            video_decoder = video_decoder or RemoteVae(args.vae_url)
    return text_encoder, video_decoder if need_vae else None


def _write_stats(folder: Path, dit, seconds_per_step: float) -> None:
    """rank<r>.json: the rank's place, its weights and memory, idle time and per-step traffic."""
    folder.mkdir(parents=True, exist_ok=True)
    mesh, plan = dit.mesh, dit.plan
    stats = {
        "rank": mesh.rank, "stage": mesh.stage, "sp_rank": mesh.sp_rank,
        "ulysses_degree": mesh.ulysses_degree, "pp_degree": mesh.pp_degree,
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
    except Exception:
        return _die(f"[{process_label()}] error:\n{traceback.format_exc()}", 1)
    return 0
