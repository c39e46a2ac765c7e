"""The `benchmark` command line: one sub-command per measurement module."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import benchmark
from benchmark import ascend, comm, dit, layouts, load, parallel, step, streaming, text, vae
from benchmark.measure import machine_line

COMMANDS = {"dit": dit.run, "vae": vae.run, "text": text.run, "step": step.run, "comm": comm.run, "load": load.run,
            "ascend": ascend.run, "parallel": parallel.run, "layouts": layouts.run, "streaming": streaming.run}


def main(argv=None) -> int:
    """Run one measurement, print its section, append it to --append FILE; 0 on success."""
    p = argparse.ArgumentParser(prog="benchmark", description=benchmark.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=sorted(COMMANDS))
    p.add_argument("target", nargs="?", choices=("cpu", "ascend"), default="cpu",
                   help="streaming: measure on this CPU, or the Ascend 910B projection on paper")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (CI)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default 5)")
    p.add_argument("--modes", nargs="+", default=["pynative", "jit"], choices=["pynative", "jit"],
                   help="DiT execution modes to measure (dit)")
    p.add_argument("--profile", action="store_true", help="dit: add a per-op-type profile of the compiled forward")
    p.add_argument("--graph-kernel", action="store_true",
                   help="dit: also fuse element-wise ops in the compiled graphs (AKG; needs `decorator`)")
    p.add_argument("--blocks", type=int, default=64, help="streaming: DiT blocks of 8 x 128 heads (64: 4.3 GB fp32)")
    p.add_argument("--file-dtype", choices=("fp32", "bf16"), default="fp32", help="streaming: dtype of the shards")
    p.add_argument("--steps", type=int, default=2, help="streaming: timed DiT calls per run, after one warm-up")
    p.add_argument("--eager", action="store_true", help="streaming: run the DiT op by op (default: compiled)")
    p.add_argument("--no-msrun", action="store_true", help="streaming: skip the 2-rank runs")
    p.add_argument("--tmp", default=None, help="streaming: folder for the temporary checkpoint (default: the system's)")
    p.add_argument("--append", metavar="FILE", help="append the printed section to this Markdown file")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    shown = [a for i, a in enumerate(argv) if a != "--append" and (i == 0 or argv[i - 1] != "--append")]
    append = Path(args.append).resolve() if args.append else None
    header = machine_line(" ".join(shown))
    body = COMMANDS[args.command](args)
    section = f"\n{header}\n\n{body}\n"
    print(section)
    if append:
        with open(append, "a") as f:
            f.write(section)
    return 0

