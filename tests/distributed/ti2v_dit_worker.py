"""One msrun worker of tests/distributed/test_ti2v_parallel.py (not a test module itself).

    msrun ... ti2v_dit_worker.py OUT_DIR TRANSFORMER_DIR LAYOUT [LAYOUT ...]

LAYOUT names the degrees of the axes that are not 1, e.g. `sp2_pp2` or `cfg2_tp2` (pp, cfg, tp, sp;
their product is the job's world size), and `_offload` for streamed blocks (`--offload blocks`). For
each layout in turn, the same processes build that mesh, load their part of the golden TI2V DiT
(`ti2v_dit`) with `DistributedDiT`, run every golden case
(condition latent + motion score) and write the prediction this rank received to
OUT_DIR/<layout>/rank<r>.safetensors. Groups of the same ranks are shared between layouts
(MindSpore hands back the existing group when a group of the same ranks is asked for again).
"""
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: support.py

from mindspore import Tensor  # noqa: E402

from stepvideo import backend  # noqa: E402
from stepvideo.utils import safetensors_io as st  # noqa: E402
from support import cases, load  # noqa: E402

AXES = {"pp": "pp_degree", "cfg": "cfg_degree", "tp": "tp_degree", "sp": "ulysses_degree"}


def degrees(layout: str) -> dict:
    """'cfg2_tp2' -> {"cfg_degree": 2, "tp_degree": 2, "pp_degree": 1, "ulysses_degree": 1}."""
    parts = re.fullmatch(r"((pp|cfg|tp|sp)\d+)(_((pp|cfg|tp|sp)\d+))*(_offload)?", layout)
    if parts is None:
        raise ValueError(f"layout {layout!r}: expected axes such as sp2_pp2 or cfg2_tp2 (pp, cfg, tp, sp), "
                         "optionally followed by _offload")
    out = dict.fromkeys(AXES.values(), 1)
    for axis, degree in re.findall(r"(pp|cfg|tp|sp)(\d+)", layout):
        out[AXES[axis]] = int(degree)
    return out


def run_layout(layout: str, rank: int, world: int, transformer: str, out_dir: Path) -> None:
    from stepvideo.parallel.collectives import make_collectives
    from stepvideo.parallel.mesh import Mesh
    from stepvideo.parallel.pipeline import DistributedDiT

    started = time.perf_counter()
    mesh = Mesh(rank=rank, world_size=world, **degrees(layout))
    dit = DistributedDiT.from_pretrained(transformer, mesh, make_collectives(mesh),
                                         offload=layout.endswith("_offload"))
    inputs = load("ti2v_dit", "inputs")
    results = {}
    for spec in cases("ti2v_dit")["cases"]:
        c = spec["name"]
        out = dit(hidden_states=Tensor(inputs[f"{c}.hidden_states"]), timestep=Tensor(inputs[f"{c}.timestep"]),
                  encoder_hidden_states=Tensor(inputs[f"{c}.encoder_hidden_states"]),
                  encoder_attention_mask=Tensor(inputs[f"{c}.encoder_attention_mask"]),
                  encoder_hidden_states_2=Tensor(inputs[f"{c}.encoder_hidden_states_2"]),
                  condition_hidden_states=Tensor(inputs[f"{c}.condition_hidden_states"]),
                  motion_score=spec["motion_score"], return_dict=False)
        results[f"{c}.output"] = out.asnumpy()
    streamed = dit.streamer is not None and dit.streamer.stats.fills > 0 and dit.load_report["block_bytes"] == 0
    blocks = "blocks streamed" if streamed else f"{dit.load_report['block_bytes']} bytes of resident blocks"
    if dit.streamer is not None:
        dit.streamer.close()
    (out_dir / layout).mkdir(parents=True, exist_ok=True)
    st.save_file(out_dir / layout / f"rank{rank}.safetensors", results)
    print(f"rank {rank} ({layout}): stage {mesh.stage} cfg {mesh.cfg_rank} tp {mesh.tp_rank} sp {mesh.sp_rank} holds "
          f"{dit.plan.describe()}, {dit.load_report['sliced_tensors']} sliced tensors, {blocks}; "
          f"{time.perf_counter() - started:.1f} s", flush=True)


def main(out_dir: str, transformer: str, *layouts: str) -> None:
    backend.init("cpu")
    from stepvideo.parallel.collectives import init_process_group

    joined = init_process_group()
    for layout in layouts:
        run_layout(layout, joined.rank, joined.world_size, transformer, Path(out_dir))


if __name__ == "__main__":
    main(*sys.argv[1:])
