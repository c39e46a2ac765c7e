"""Which part of `stepvideo/` imports which, at module level and inside functions, read from the source.

    python scripts/import_graph.py [--root stepvideo] [--oneline]

A part is a subpackage (`stepvideo/serving/`) or a top-level module (`stepvideo/backend.py`).
Each part gets two lists: what its modules import at module level, and what they import
only inside functions (marked `(lazy)` in the one-line form, `--oneline`). Edges within one
part are left out.
Used to check that dependencies point one way (models <- pipeline <- parallel / serving <- entry).
"""
from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from pathlib import Path


def part_of(module: str) -> str:
    """`stepvideo.serving.client` -> `serving`; `stepvideo.backend` -> `backend`."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else pieces[0]


def imports_of(path: Path, package: str) -> dict:
    """{`package.*` module that `path` imports: True if imported at module level} (absolute imports only)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    found = {}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith(package + ".")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith(package + "."):
                names = [node.module]
            elif node.module == package:
                names = [f"{package}.{a.name}" for a in node.names]
        for name in names:
            found[name] = found.get(name, False) or id(node) in top
    return found


def graph(root: Path) -> dict:
    """{part: {imported part: True if any import of it is at module level}}."""
    package = root.name
    edges = defaultdict(dict)
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        src = part_of(module)
        edges[src]
        for target, at_top in imports_of(path, package).items():
            dst = part_of(target)
            if dst != src:
                edges[src][dst] = edges[src].get(dst, False) or at_top
    return {src: dict(sorted(dsts.items())) for src, dsts in sorted(edges.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="stepvideo", help="the package folder")
    parser.add_argument("--oneline", action="store_true", help="one line a part, function-level edges marked (lazy)")
    args = parser.parse_args()
    edges = graph(Path(args.root))
    for src, dsts in edges.items():
        top = [d for d, at_top in dsts.items() if at_top]
        lazy = [d for d, at_top in dsts.items() if not at_top]
        if args.oneline:
            shown = top + [f"{d} (lazy)" for d in lazy]
            print(f"{src:14s} -> {', '.join(shown) if shown else '(nothing)'}")
        else:
            print(f"{src:14s} module level:   {', '.join(top) or '-'}")
            if lazy:
                print(f"{'':14s} in functions:   {', '.join(lazy)}")
    cycles = sorted({tuple(sorted((a, b))) for a, ds in edges.items() for b in ds if a in edges.get(b, ())})
    print("two-way:", ", ".join(f"{a} <-> {b}" for a, b in cycles) if cycles else "none")


if __name__ == "__main__":
    main()
