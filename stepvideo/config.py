"""Command-line flags of `run_parallel.py`, with the original's names and defaults.

Kept from the original (stepvideo/config.py): --model_dir --vae_url --caption_url
--ulysses_degree --prompt --infer_steps --cfg_scale --time_shift --num_frames
--height --width --seed --save_path --name_suffix --num_videos --pos_magic
--neg_magic --tensor_parallel_degree. Added: --pp_degree and --layer_split (pipeline
stages), --cfg_parallel_degree, --local_models, --output_type, --latents_out, --device,
--eager, --stats_dir, --offload, --prompt_file, --preset, --wait_services, --decode_latents.

Not kept: --ring_degree (not implemented here: a value other than 1 would
silently do something else), and the original's
parsed-but-unused --flow_reverse, --flow_solver, --model_resolution,
--use-cpu-offload and --batch_size.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

POS_MAGIC = "超高清、HDR 视频、环境光、杜比全景声、画面稳定、流畅动作、逼真的细节、专业级构图、超现实主义、自然、生动、超细节、清晰。"
NEG_MAGIC = "画面暗、低分辨率、不良手、文本、缺少手指、多余的手指、裁剪、低质量、颗粒状、签名、水印、用户名、模糊。"


def layer_split(text: str) -> List[int]:
    """'20,28' -> [20, 28] (blocks per pipeline stage)."""
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block counts such as 20,28, got {text!r}") from None
    if any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"every stage needs at least one block, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Step-Video-T2V inference (msrun entry point: DiT split over "
                                                 "pipeline stages x Ulysses sequence parallelism)")

    models = parser.add_argument_group("models and services")
    models.add_argument("--model_dir", type=str, default="./ckpts",
                        help="model folder: model_index.json, transformer/, scheduler/ (and step_llm/, "
                             "hunyuan_clip/, vae/ with --local_models)")
    models.add_argument("--vae_url", type=str, default="127.0.0.1", help="VAE service: host, host:port or URL")
    models.add_argument("--caption_url", type=str, default="127.0.0.1",
                        help="caption (text encoder) service: host, host:port or URL")
    models.add_argument("--local_models", action="store_true",
                        help="run the text encoders and the VAE in-process on rank 0 (from --model_dir) instead "
                             "of calling the services")

    schedule = parser.add_argument_group("denoising schedule")
    schedule.add_argument("--time_shift", type=float, default=13.0,
                          help="flow-matching shift (default 13.0 as the original README recommends; the "
                               "original config.py defaulted to 7.0, which gives worse videos; turbo: 17.0)")
    schedule.add_argument("--infer_steps", type=int, default=50, help="denoising steps")
    schedule.add_argument("--cfg_scale", type=float, default=9.0, help="classifier-free guidance scale")

    inference = parser.add_argument_group("inference")
    inference.add_argument("--prompt", type=str, default=None, help="the text prompt (required)")
    inference.add_argument("--num_frames", type=int, default=204, help="frames (rounded down to a multiple of 17)")
    inference.add_argument("--height", type=int, default=544, help="height (rounded down to a multiple of 16)")
    inference.add_argument("--width", type=int, default=992, help="width (rounded down to a multiple of 16)")
    inference.add_argument("--seed", type=int, default=1234, help="seed of the initial noise")
    inference.add_argument("--num_videos", type=int, default=1, help="videos per prompt")
    inference.add_argument("--pos_magic", type=str, default=POS_MAGIC, help="appended to the prompt")
    inference.add_argument("--neg_magic", type=str, default=NEG_MAGIC, help="the negative prompt")
    inference.add_argument("--save_path", type=str, default="./results", help="folder for the videos")
    inference.add_argument("--name_suffix", type=str, default="", help="suffix of the video file names")
    inference.add_argument("--output_type", choices=("mp4", "latent"), default="mp4",
                           help="mp4: decode and write the video on rank 0; latent: stop after denoising")
    inference.add_argument("--latents_out", type=str, default=None,
                           help="rank 0 also writes the final latents to this .safetensors file (key 'latents')")

    parallel = parser.add_argument_group("parallelism and device")
    parallel.add_argument("--ulysses_degree", type=int, default=8,
                          help="ranks per pipeline stage splitting the video tokens (must divide the heads)")
    parallel.add_argument("--pp_degree", type=int, default=1, help="pipeline stages")
    parallel.add_argument("--layer_split", type=layer_split, default=None,
                          help="blocks per stage, e.g. 20,28 (default: balanced)")
    parallel.add_argument("--device", choices=("auto", "cpu", "ascend"), default="auto",
                          help="auto: Ascend when available, else CPU (fp32)")
    parallel.add_argument("--eager", action="store_true",
                          help="run the DiT op by op (pynative) instead of as compiled graphs (mindspore.jit; "
                               "one compile per block at the first step, then 2.4x faster on CPU)")
    parallel.add_argument("--stats_dir", type=str, default=None,
                          help="each rank writes rank<r>.json here: weights loaded, memory, idle time, traffic")

    memory = parser.add_argument_group("memory")
    memory.add_argument("--offload", choices=("none", "blocks"), default="none",
                        help="blocks: keep each rank's DiT blocks (and, with --local_models, Step-LLM's layers) in "
                             "the memory-mapped checkpoint and bring each one in just before it runs, the next one "
                             "while the current one computes; memory for the other weights + 2 blocks, same "
                             "numbers. Needs safetensors checkpoints")

    more = parser.add_argument_group("tensor and CFG parallelism (workers = pp x cfg x tensor x ulysses)")
    more.add_argument("--tensor_parallel_degree", type=int, default=1,
                      help="ranks splitting every block's heads and FFN width (heads / tensor / ulysses whole)")
    more.add_argument("--cfg_parallel_degree", type=int, default=1, choices=(1, 2),
                      help="2: the conditional and unconditional rows on two rank groups")

    jobs = parser.add_argument_group("prompts, presets, services and finished latents")
    jobs.add_argument("--prompt_file", type=str, default=None,
                      help="one prompt per line (blank lines skipped); the weights are loaded once for all, each "
                           "prompt gives --num_videos mp4 files, and one prompt's failure does not stop the others")
    jobs.add_argument("--preset", choices=sorted(load_presets()), default=None,
                      help="sampling settings from configs/presets.json: base (50 steps, cfg 9.0, shift 13.0) or "
                           "turbo (15 steps, cfg 5.0, shift 17.0); --infer_steps/--cfg_scale/--time_shift given "
                           "explicitly win")
    jobs.add_argument("--wait_services", type=float, default=0.0, metavar="SECONDS",
                      help="before loading the DiT, wait up to this long for services that are starting or still "
                           "loading their models (default 0: a service that is not ready is an error at once)")
    jobs.add_argument("--decode_latents", type=str, nargs="+", default=None, metavar="FILE",
                      help="no DiT: decode these latents files (written to --save_path before every decode) with "
                           "the VAE service at --vae_url (or --local_models) into mp4 files beside them")
    return parser


PRESETS_FILE = Path(__file__).resolve().parents[1] / "configs" / "presets.json"
PRESET_FLAGS = ("infer_steps", "cfg_scale", "time_shift")


def load_presets() -> Dict[str, dict]:
    """{name: {"infer_steps": .., "cfg_scale": .., "time_shift": ..}} from configs/presets.json."""
    presets = json.loads(PRESETS_FILE.read_text())
    for name, values in presets.items():
        missing = [k for k in PRESET_FLAGS if k not in values]
        if missing:
            raise ValueError(f"{PRESETS_FILE}: preset {name!r} lacks {missing}")
    return presets


def parse_args(argv: Optional[Sequence[str]] = None, namespace: Optional[argparse.Namespace] = None):
    """The flags; a --preset fills --infer_steps/--cfg_scale/--time_shift unless they were given."""
    parser = build_parser()
    args = parser.parse_args(argv, namespace=namespace)
    if args.preset is not None:
        # Parsing again with every default removed tells which flags were given explicitly.
        given = argparse.Namespace()
        bare = build_parser()
        bare.set_defaults(**{a.dest: None for a in bare._actions if a.dest != "help"})
        bare.parse_args(argv, namespace=given)
        for flag, value in load_presets()[args.preset].items():
            if flag in PRESET_FLAGS and getattr(given, flag) is None:
                setattr(args, flag, value)
    return args
