"""Peak host memory of `AutoencoderKL.decode` on CPU, one fresh process per measurement.

    python scripts/vae_memory.py                                  # tiny VAE, 1 / 2 / 4 chunks
    python scripts/vae_memory.py --config published --latent 4 4 --chunks 1

For each run a child process builds the VAE and fills every parameter by the golden weight
rule (no file). It records its resident memory after loading, decodes one chunk (3 latents:
the allocator pool grows to one chunk's activations), records the resident memory again, then
decodes 3 * chunks latents and reports the process's peak (ru_maxrss). If decoding holds one
chunk's activations at a time, "peak - output" is the same for any number of chunks while the
output grows.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 2 ** 20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(config_name: str, chunks: int, latent_hw) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    from mindspore import Tensor

    from stepvideo import backend
    from stepvideo.checkpoint import named_parameters
    from stepvideo.vae.vae import AutoencoderKL, VaeConfig
    from synthetic_weights import rule_tensor

    backend.init("cpu")
    config = VaeConfig.tiny() if config_name == "tiny" else VaeConfig()
    vae = AutoencoderKL(config=config)
    for name, param in named_parameters(vae).items():
        param.set_data(Tensor.from_numpy(rule_tensor(name, param.shape, salt="memory:")))
    z = np.random.default_rng(0).standard_normal((1, 3 * chunks, 64, *latent_hw)).astype(np.float32)
    loaded = _rss_bytes()
    vae.decode(z[:, :3])
    one_chunk = _rss_bytes()
    video = vae.decode(z)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    output = video.nbytes
    return {"config": config_name, "chunks": chunks, "latent_hw": list(latent_hw), "frames": video.shape[1],
            "loaded_mib": loaded / MiB, "one_chunk_mib": one_chunk / MiB, "peak_mib": peak / MiB,
            "output_mib": output / MiB}


def measure(config_name: str, chunks: int, latent_hw) -> dict:
    cmd = [sys.executable, __file__, "--child", "--config", config_name, "--chunks", str(chunks),
           "--latent", *map(str, latent_hw)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "GLOG_v": "3"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=["tiny", "published"], default="tiny")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--latent", type=int, nargs=2, default=[16, 16], metavar=("H", "W"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.config, args.chunks[0], args.latent)))
        return 0
    print("| config | chunks | latent h x w | frames | RSS after load (MiB) | after one chunk (MiB) | peak (MiB) "
          "| output (MiB) | peak - output (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for chunks in args.chunks:
        r = measure(args.config, chunks, args.latent)
        print(f"| {r['config']} | {r['chunks']} | {r['latent_hw'][0]} x {r['latent_hw'][1]} | {r['frames']} "
              f"| {r['loaded_mib']:.0f} | {r['one_chunk_mib']:.0f} | {r['peak_mib']:.0f} | {r['output_mib']:.1f} "
              f"| {r['peak_mib'] - r['output_mib']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
