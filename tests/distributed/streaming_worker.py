"""One msrun worker of test_streaming_parallel.py: streamed vs resident DistributedDiT in two 2-rank layouts.

    msrun --worker_num=2 ... streaming_worker.py <transformer folder>

For Ulysses 2 and for pipeline 2 (one job, one mesh after the other), each rank builds the
resident DiT and the streamed one (--offload blocks), runs the same CFG batch through both
(Ulysses compiled, as run_parallel does, with the attention exchange between each block's
two compiled halves; the pipeline eagerly, to save compiles; the streamed one twice) and prints one line
`STREAMING_RESULT {json}` with, per layout, whether every call equalled the resident
prediction bit for bit and what the streamer loaded and filled.
"""
import json
import sys

import numpy as np
from mindspore import Tensor

from stepvideo import backend

backend.init("cpu")

from stepvideo.parallel.collectives import init_process_group, make_collectives  # noqa: E402
from stepvideo.parallel.mesh import Mesh  # noqa: E402
from stepvideo.parallel.pipeline import DistributedDiT  # noqa: E402


def inputs() -> dict:
    rng = np.random.default_rng(1)
    return dict(hidden_states=Tensor(rng.standard_normal((2, 2, 8, 4, 4), dtype=np.float32)),
                timestep=Tensor(np.array([900.0, 100.0], np.float32)),
                encoder_hidden_states=Tensor(rng.standard_normal((2, 6, 64), dtype=np.float32)),
                encoder_attention_mask=Tensor(np.array([[1] * 10, [1] * 7 + [0] * 3], np.float32)),
                encoder_hidden_states_2=Tensor(rng.standard_normal((2, 4, 32), dtype=np.float32)),
                return_dict=False)


def main(folder: str) -> None:
    world = init_process_group()
    result = {"rank": world.rank}
    for name, u, pp in (("sp2", 2, 1), ("pp2", 1, 2)):
        mesh = Mesh(rank=world.rank, world_size=world.world_size, ulysses_degree=u, pp_degree=pp)
        collectives = make_collectives(mesh)
        jit = name == "sp2"
        resident = DistributedDiT.from_pretrained(folder, mesh, collectives).set_jit(jit)
        expected = resident(**inputs()).asnumpy()
        streamed = DistributedDiT.from_pretrained(folder, mesh, collectives, offload=True).set_jit(jit)
        equal = [bool(np.array_equal(streamed(**inputs()).asnumpy(), expected)) for _ in range(2)]
        result[name] = {"equal": equal, "blocks": [streamed.plan.blocks.start, streamed.plan.blocks.stop],
                        "resident_bytes": resident.load_report["bytes"], "streamed_load": streamed.load_report,
                        "stats": streamed.streamer.stats.as_dict()}
        streamed.streamer.close()
        collectives.barrier()
    print("STREAMING_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
