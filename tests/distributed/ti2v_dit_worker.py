"""One msrun worker of tests/distributed/test_ti2v_parallel.py (not a test module itself).

    msrun ... ti2v_dit_worker.py OUT_DIR TRANSFORMER_DIR ULYSSES PP

Loads this rank's stage of the golden TI2V DiT (`ti2v_dit`) with `DistributedDiT`, runs every
golden case (condition latent + motion score) and writes the prediction this rank received to
OUT_DIR/rank<r>.safetensors.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: support.py

from mindspore import Tensor  # noqa: E402

from stepvideo import backend  # noqa: E402
from stepvideo.utils import safetensors_io as st  # noqa: E402
from support import cases, load  # noqa: E402


def main(out_dir: str, transformer: str, ulysses: str, pp: str) -> None:
    backend.init("cpu")
    from stepvideo.parallel.collectives import init_process_group, make_collectives
    from stepvideo.parallel.mesh import Mesh
    from stepvideo.parallel.pipeline import DistributedDiT

    joined = init_process_group()
    mesh = Mesh(rank=joined.rank, world_size=joined.world_size, ulysses_degree=int(ulysses), pp_degree=int(pp))
    dit = DistributedDiT.from_pretrained(transformer, mesh, make_collectives(mesh))
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
    st.save_file(Path(out_dir) / f"rank{mesh.rank}.safetensors", results)
    print(f"rank {mesh.rank}: stage {mesh.stage} holds {dit.plan.describe()}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
