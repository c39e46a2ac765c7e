"""One rank of `benchmark comm`, started by msrun with 2 workers; prints `COMM_RESULT {json}`.

    msrun --worker_num=2 ... comm_worker.py <repository root> <tokens> <dim> <heads> <repeats>

Times the Ulysses q/k/v + output exchange of one block and the pipeline stage hand-off
with the CPU emulations of the collectives.
"""
import json
import statistics
import sys
import time

sys.path.insert(0, sys.argv[1])
import numpy as np
from mindspore import Tensor
from stepvideo import backend
backend.init("cpu")
from stepvideo.parallel.collectives import init_process_group, make_collectives
from stepvideo.parallel.mesh import Mesh
tokens, dim, heads, repeats = (int(v) for v in sys.argv[2:6])
world = init_process_group()
rank = world.rank
rng = np.random.default_rng(rank)
result = {"rank": rank}
# Ulysses: the q/k/v exchange (b, n/u, 3, H, d) -> (b, n, 3, H/u, d) and the output back.
sp = make_collectives(Mesh(rank=rank, world_size=2, ulysses_degree=2, pp_degree=1))
qkv = Tensor(rng.standard_normal((1, tokens // 2, 3, heads, dim // heads), dtype=np.float32))
out = Tensor(rng.standard_normal((1, tokens, heads // 2, dim // heads), dtype=np.float32))
times = []
for i in range(repeats + 1):
    sp.barrier()
    t = time.perf_counter()
    sp.sp_all_to_all(qkv, scatter_dim=3, gather_dim=1).asnumpy()
    sp.sp_all_to_all(out, scatter_dim=1, gather_dim=2).asnumpy()
    times.append(time.perf_counter() - t)
result["ulysses_s"] = statistics.median(times[1:])
result["ulysses_bytes"] = int(qkv.nbytes + out.nbytes)
# Pipeline hand-off: the hidden-state shard (b, n, D) from stage 0 (rank 0) to stage 1 (rank 1).
pp = make_collectives(Mesh(rank=rank, world_size=2, ulysses_degree=1, pp_degree=2))
hidden = Tensor(rng.standard_normal((1, tokens, dim), dtype=np.float32))
times = []
for i in range(repeats + 1):
    pp.barrier()
    t = time.perf_counter()
    if rank == 0:
        pp.send({"hidden": hidden}, 1)
    else:
        pp.recv(0)["hidden"].asnumpy()
    times.append(time.perf_counter() - t)
result["handoff_s"] = statistics.median(times[1:])
result["handoff_bytes"] = int(hidden.nbytes)
pp.barrier()  # the sender's last broadcast must complete before the receiver exits
print("COMM_RESULT " + json.dumps(result), flush=True)
