"""The caption service (Step-LLM + CLIP) and/or the VAE service, over HTTP.

    python api/call_remote_server.py --model_dir DIR --enable_llm True    # caption only, port 5000
    python api/call_remote_server.py --model_dir DIR --enable_vae True    # VAE only, port 5001
    python api/call_remote_server.py --model_dir DIR                      # both, port 5000 (one process)

Only the flags named count: a flag given alone decides both models (`--enable_vae
True` alone serves only the VAE, `--enable_llm False` alone serves only the VAE);
both flags given are taken as they are (both True: both models, with a warning
about memory); no flag serves both, as the original's one-process mode.

The port is taken and listening before any model loads, so a second service on
the same port fails at once; while the models load, GET /health answers 503
{"status": "loading", ...}. Once they are loaded it prints one line per service,
e.g. `caption_url: http://127.0.0.1:5000`; pass those to the DiT job as
--caption_url / --vae_url. Endpoints and wire format: `stepvideo/serving/server.py`;
port and loading answers: `stepvideo/serving/listening.py`; graceful stop: `stepvideo/serving/running.py`.

Unlike the original (which bound 0.0.0.0 and unpickled request bodies, so anyone
who reached the port could run code), it binds 127.0.0.1 unless --host says
otherwise, parses only JSON and safetensors, and can require a shared secret
(--token or env STEPVIDEO_API_TOKEN).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

try:
    import stepvideo  # noqa: F401
except ImportError:  # run as `python api/call_remote_server.py` from a checkout without PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepvideo.serving import wire  # noqa: E402
from stepvideo.serving.limits import DEFAULT_MAX_BODY_MB, Costs, Limits  # noqa: E402

log = logging.getLogger("stepvideo.serving")


def str2bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def served_models(enable_llm: Optional[bool], enable_vae: Optional[bool]) -> Tuple[bool, bool]:
    """(caption, vae) to serve from the flags as given (None: not named on the command line).

    A flag named alone decides for both: `--enable_vae True` means "the VAE service",
    not "the VAE too", which is how the published two-process commands read.
    """
    if enable_llm is None and enable_vae is None:
        return True, True
    if enable_vae is None:
        return enable_llm, not enable_llm
    if enable_llm is None:
        return not enable_vae, enable_vae
    return enable_llm, enable_vae


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Step-Video caption / VAE services",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="the model folder (step_llm/, hunyuan_clip/, vae/)")
    parser.add_argument("--enable_llm", type=str2bool, default=None, metavar="True|False",
                        help="serve the caption model (Step-LLM + CLIP) at /caption-api (alone: only it)")
    parser.add_argument("--enable_vae", type=str2bool, default=None, metavar="True|False",
                        help="serve the VAE at /vae-api and /vae-encode-api (TI2V's image encode) (alone: only "
                             "it; neither flag: both models)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; anything but loopback should come with --token")
    parser.add_argument("--port", type=int, default=None,
                        help=f"port (default: {wire.DEFAULT_PORTS['caption']} when serving the caption model, "
                             f"else {wire.DEFAULT_PORTS['vae']}; 0 picks a free one)")
    parser.add_argument("--device_id", type=int, default=None, help="accelerator index (Ascend)")
    parser.add_argument("--token", default=None,
                        help=f"shared secret clients must send (default: env {wire.TOKEN_ENV}; none: no check)")
    parser.add_argument("--max_body_mb", type=float, default=DEFAULT_MAX_BODY_MB,
                        help="largest request body accepted, in MiB")
    parser.add_argument("--offload", choices=("none", "blocks"), default="none",
                        help="blocks: stream Step-LLM's layers from the memory-mapped checkpoint instead of holding "
                             "them (memory: embeddings + 2 layers instead of 48; same numbers, each request then "
                             "reads the layers again)")
    parser.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    add_limit_arguments(parser)
    args = parser.parse_args(argv)
    check_limit_arguments(parser, args)
    # Both named True is a deliberate request for one process with both models: warn about memory.
    args.warn_memory = args.enable_llm is True and args.enable_vae is True
    args.enable_llm, args.enable_vae = served_models(args.enable_llm, args.enable_vae)
    if not (args.enable_llm or args.enable_vae):
        parser.error("nothing to serve: --enable_llm and --enable_vae are both False")
    if args.port is None:
        args.port = wire.DEFAULT_PORTS["caption" if args.enable_llm else "vae"]
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if not args.max_body_mb > 0:
        parser.error(f"--max_body_mb must be > 0, got {args.max_body_mb}")
    if args.token is None:
        args.token = os.environ.get(wire.TOKEN_ENV) or None
    if args.token is not None:
        try:
            wire.check_token(args.token)
        except ValueError as e:
            parser.error(str(e))
    if not Path(args.model_dir).is_dir():
        parser.error(f"--model_dir {args.model_dir!r} is not a folder")
    return args


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """What one request may cost and how long clients may take (stepvideo/serving/limits.py Limits)."""
    group = parser.add_argument_group("request limits")
    group.add_argument("--max_memory_gb", type=float, default=None,
                       help="refuse (413) a request whose estimated memory (weights + activations + output, "
                            "stepvideo/serving/costs.py) exceeds this many GB (default: 24 on Ascend, an eighth of "
                            "the RAM up to 24 on CPU)")
    group.add_argument("--body_timeout", type=float, default=Limits.body_timeout_s,
                       help="seconds a request body may take to arrive (408 after)")
    group.add_argument("--max_connections", type=int, default=Limits.max_connections,
                       help="open connections served at once (more get 503)")
    group.add_argument("--shutdown_grace", type=float, default=Limits.shutdown_grace_s,
                       help="after SIGTERM, seconds the running job may take before the process exits without it")


def check_limit_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("max_memory_gb", "body_timeout", "max_connections"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name} must be > 0, got {value}")
    if not args.shutdown_grace >= 0:
        parser.error(f"--shutdown_grace must be >= 0, got {args.shutdown_grace}")


def limits_and_costs(args: argparse.Namespace, caption, vae, info):
    """(Limits, Costs) for the loaded models on `info.device` (a `backend.BackendInfo`)."""
    import mindspore as ms

    from stepvideo.checkpoint import named_parameters
    from stepvideo.serving.costs import CaptionCost, VaeCost, default_memory_limit_gb

    def weight_bytes(*cells) -> int:
        return sum(p.nbytes for cell in cells for p in named_parameters(cell).values())

    on_cpu = info.device.upper() == "CPU"
    itemsize = 2 if info.compute_dtype == ms.bfloat16 else 4
    max_memory_gb = args.max_memory_gb if args.max_memory_gb is not None else default_memory_limit_gb(info.device)
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_memory_bytes=int(max_memory_gb * 1e9),
                    body_timeout_s=args.body_timeout, max_connections=args.max_connections,
                    shutdown_grace_s=args.shutdown_grace)
    costs = Costs(
        vae=VaeCost.from_config(vae.vae.config, z_channels=vae.z_channels, itemsize=itemsize,
                                weights_bytes=weight_bytes(vae.vae), on_cpu=on_cpu) if vae else None,
        caption=CaptionCost.from_model_dir(args.model_dir, itemsize=itemsize, weights_bytes=weight_bytes(
            caption.encoder.text_encoder, caption.encoder.clip)) if caption else None)
    log.info("request limits: %.1f GB of memory per request, body within %g s, %d connections, %g s grace on SIGTERM",
             max_memory_gb, args.body_timeout, args.max_connections, args.shutdown_grace)
    return limits, costs


def load_models(args: argparse.Namespace):
    """(caption or None, vae or None, backend info), or None after printing why the models cannot load."""
    from stepvideo import backend  # MindSpore: imported only once the port is ours
    from stepvideo.diffusion.interfaces import LocalCaption, LocalVae

    info = backend.init(device_id=args.device_id)
    started = time.perf_counter()
    try:
        caption = (LocalCaption.from_model_dir(args.model_dir, offload=args.offload == "blocks")
                   if args.enable_llm else None)
        vae = LocalVae.from_model_dir(args.model_dir) if args.enable_vae else None
    except (OSError, ValueError) as e:  # missing or damaged files (CheckpointError is a ValueError)
        print(f"error: cannot load the models from {args.model_dir}: {e}", file=sys.stderr)
        return None
    log.info("models loaded in %.1f s on %s", time.perf_counter() - started, info.device)
    return caption, vae, info


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from stepvideo.serving import listening  # no web framework: the port is checked in about a second

    if not listening.is_loopback(args.host) and not args.token:
        print(f"WARNING: binding {args.host} without a token: anyone who can reach this port can use the "
              f"services. Set --token or {wire.TOKEN_ENV}.", file=sys.stderr, flush=True)
    if args.warn_memory:
        log.warning("serving both the caption model (Step-LLM + CLIP) and the VAE in this process: Step-LLM's "
                    "weights and a VAE decode's peak (about 18 GB for 544x992x204 in bf16, docs/vae_memory.md) "
                    "must fit in one device's memory together; if they do not, run two services, "
                    "--enable_llm True and --enable_vae True, on two devices")
    try:
        sock = listening.bind_socket(args.host, args.port)  # listening now: a taken port fails before any loading
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    models = {"caption": args.enable_llm, "vae": args.enable_vae}
    responder = listening.LoadingResponder(sock, models, max_body_bytes=int(args.max_body_mb * 2**20)).start()
    log.info("listening on %s; loading %s", listening.url_for(sock), " and ".join(m for m, on in models.items() if on))

    from stepvideo.serving import running, server  # the web framework, imported while the port answers "loading"

    loaded = load_models(args)
    responder.stop()  # the socket keeps listening; uvicorn answers the queued connections
    if loaded is None:
        return 1
    caption, vae, info = loaded

    limits, costs = limits_and_costs(args, caption, vae, info)
    app = server.create_app(caption, vae, token=args.token, limits=limits, device=info.device,
                            dtype=str(info.compute_dtype).lower(), vae_channels=vae.z_channels if vae else 64,
                            costs=costs)
    url = listening.url_for(sock)

    def ready():
        for name, on in (("caption_url", caption), ("vae_url", vae)):
            if on is not None:
                print(f"{name}: {url}", flush=True)

    running.serve(app, sock, ready, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
