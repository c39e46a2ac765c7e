"""Hostile inputs, before and after: what each costs the checkpoint reader (answer, time, peak RSS).

    python scripts/benchmark_hostile.py bombs --before /work/main          # the PyTorch-reader bombs
    python scripts/benchmark_hostile.py bombs --before /work/main --size_mib 2048

Each bomb file is opened by the reader of each checkout (this one, and `--before`'s) in a fresh
process whose address space is capped (`--cap_gib` over its baseline), so a reader that falls
for a bomb gets MemoryError instead of taking the machine down; the table says so when that
happened. Peak RSS is ru_maxrss of the child minus its value after importing the reader.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import bombs  # noqa: E402

MiB = 2**20


def _row(label: str, size: int, result: dict) -> str:
    error = result["error"] or f"no error: produced {result['produced_bytes'] / MiB:.0f} MiB"
    return (f"| {label} | {size} | {error[:150]} | {result['seconds']:.2f} | "
            f"{result['peak_over_baseline'] / MiB:.0f} |")


def run_bombs(before: Path, size: int, cap: int) -> None:
    checkouts = [("before", before), ("after", ROOT)]
    print("| bomb | file bytes | answer | seconds | peak RSS over baseline (MiB) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, build in bombs.BOMBS.items():
            path, _ = build(folder / "bomb.bin", 2**27 if "memo" in name else size) if "opcodes" not in name \
                else build(folder / "bomb.bin")
            for label, root in checkouts:
                print(_row(f"{name} ({label})", path.stat().st_size, bombs.measure(root, "read", path, cap)),
                      flush=True)
            path.unlink()
        convert_dir = folder / "convert"
        convert_dir.mkdir()
        pt, _, _ = bombs.convert_bomb(convert_dir)
        for label, root in checkouts:
            print(_row(f"convert.py, stride-0 CLIP ({label})", pt.stat().st_size,
                       bombs.measure(root, "convert", pt, cap)), flush=True)
            (convert_dir / "model.safetensors").unlink(missing_ok=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("bombs", help="the PyTorch-reader bombs")
    b.add_argument("--before", type=Path, required=True, help="checkout with the code before the change")
    b.add_argument("--size_mib", type=int, default=1024, help="what each bomb claims")
    b.add_argument("--cap_gib", type=float, default=3.0, help="address-space cap per reader process")
    args = parser.parse_args(argv)
    if args.what == "bombs":
        run_bombs(args.before, args.size_mib * MiB, int(args.cap_gib * 2**30))
    return 0


if __name__ == "__main__":
    sys.exit(main())
