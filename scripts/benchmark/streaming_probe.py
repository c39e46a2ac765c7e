"""One measured process (or msrun rank) of `benchmark streaming cpu`; prints `PROBE_RESULT {json}`.

    python streaming_probe.py <repository root> <transformer folder> resident|streamed <steps> <jit 0|1>

Builds the DiT lazily, resets the peak-RSS counter (/proc/self/clear_refs), loads it (all
weights resident, or the blocks streamed), then makes one warm-up call (the compile when
jit) while a thread samples /proc/self/smaps, and `steps` timed calls without the sampler:
walking smaps costs the kernel a page-table walk of the whole process (measured 160-500 ms
per read of a 1 GB process on the shared 2-core machine), so a sampler running during the
timed calls took most of a core from the DiT it was timing. Under msrun (MS_ROLE set) the
ranks form a Ulysses group of the world size and load with `DistributedDiT.from_pretrained`.
"""
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Dict

sys.path.insert(0, sys.argv[1])
import numpy as np  # noqa: E402

from stepvideo import backend  # noqa: E402

backend.init("cpu")

TOKENS = (1, 8, 8)  # latent frames, height, width: 64 video tokens per CFG row
LLM_TOKENS, CLIP_TOKENS = 64, 16
CHANNELS = (1024, 256)  # caption channels of the medium model (LLM, CLIP)


class SmapsSampler:
    """Maxima over time of /proc/self/smaps_rollup's fields, and of the checkpoint files' mappings (bytes).

    smaps_rollup's Shared_Clean is mostly the shared libraries (MindSpore's); `folder_peak` counts only
    the mappings of `.safetensors` files under `folder` (the mapped shards), from /proc/self/smaps.
    """

    FIELDS = ("Rss", "Pss", "Shared_Clean", "Private_Clean", "Private_Dirty", "Anonymous")

    def __init__(self, folder: str, period: float = 0.5):
        self.folder = str(Path(folder).resolve())
        self.period = period
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self.folder_peak = {"Rss": 0, "Pss": 0, "Shared_Clean": 0}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> Dict[str, int]:
        out = {}
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in SmapsSampler.FIELDS:
                    out[name] = int(rest.split()[0]) * 1024
        return out

    def read_folder(self) -> Dict[str, int]:
        out = dict.fromkeys(self.folder_peak, 0)
        inside = False
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's first line: address range ... path
                    inside = line.rstrip().endswith(".safetensors") and self.folder in line
                elif inside:
                    name, _, rest = line.partition(":")
                    if name in out:
                        out[name] += int(rest.split()[0]) * 1024
        return out

    def _run(self):
        while not self._stop.is_set():
            for k, v in self.read().items():
                self.peak[k] = max(self.peak[k], v)
            for k, v in self.read_folder().items():
                self.folder_peak[k] = max(self.folder_peak[k], v)
            self.samples += 1
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def inputs(batch: int = 2) -> dict:
    """One denoising step's DiT inputs: the CFG batch of 2, TOKENS video tokens, 80 text tokens."""
    from mindspore import Tensor
    rng = np.random.default_rng(1)
    frames, h, w = TOKENS
    return dict(hidden_states=Tensor(rng.standard_normal((batch, frames, 64, h, w), dtype=np.float32)),
                timestep=Tensor(np.linspace(900, 100, batch).astype(np.float32)),
                encoder_hidden_states=Tensor(rng.standard_normal((batch, LLM_TOKENS, CHANNELS[0]), dtype=np.float32)),
                encoder_attention_mask=Tensor(np.ones((batch, CLIP_TOKENS + LLM_TOKENS), np.float32)),
                encoder_hidden_states_2=Tensor(rng.standard_normal((batch, CLIP_TOKENS, CHANNELS[1]),
                                                                   dtype=np.float32)),
                return_dict=False)


def probe(folder: str, mode: str, steps: int, jit: bool) -> dict:
    """Load (resident or streamed), one sampled warm-up call, `steps` timed calls; memory and time."""
    from stepvideo.checkpoint import load_weights, read_config
    from stepvideo.modules.model import StepVideoModel

    distributed = os.environ.get("MS_ROLE") in ("MS_SCHED", "MS_WORKER")
    config = read_config(folder)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    rss0 = status("VmRSS")
    streamer = None
    t0 = time.perf_counter()
    if distributed:
        from stepvideo.parallel.collectives import init_process_group, make_collectives
        from stepvideo.parallel.mesh import Mesh
        from stepvideo.parallel.pipeline import DistributedDiT
        world = init_process_group()
        mesh = Mesh(rank=world.rank, world_size=world.world_size, ulysses_degree=world.world_size, pp_degree=1)
        collectives = make_collectives(mesh)
        rss0 = status("VmRSS")  # after the process group: its buffers are not weights
        t0 = time.perf_counter()
        model = DistributedDiT.from_pretrained(folder, mesh, collectives, offload=mode == "streamed")
        streamer, loaded = model.streamer, model.load_report["bytes"]
    else:
        model = StepVideoModel.from_config_dict(config)
        if mode == "streamed":
            from stepvideo.streaming import dit_streaming
            report, streamer = dit_streaming(model, folder, range(config["num_layers"]))
        else:
            report = load_weights(model, folder)
        model.set_train(False)
        loaded = report.bytes
    load_s = time.perf_counter() - t0
    after_load = status("VmRSS") - rss0
    model.set_jit(jit)
    x = inputs()
    with SmapsSampler(folder) as sampler:
        t = time.perf_counter()
        model(**x).asnumpy()
        first = time.perf_counter() - t
    if streamer is not None:
        streamer.stats.wait_seconds = streamer.stats.fill_seconds = 0.0
    wall, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()  # process CPU time: every thread, the fills included
        model(**x).asnumpy()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"mode": mode, "rank": int(os.environ.get("RANK_ID", 0)) if distributed else 0,
            "loaded_bytes": loaded, "load_s": load_s, "after_load": after_load, "peak": status("VmHWM") - rss0,
            "first_call_s": first, "step_s": wall, "step_cpu_s": cpu, "smaps_peak": sampler.peak,
            "files_peak": sampler.folder_peak, "samples": sampler.samples,
            "stream": streamer.stats.as_dict() if streamer else None,
            "slot_bytes": streamer.slot_bytes() if streamer else 0}


if __name__ == "__main__":
    result = probe(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1")
    print("PROBE_RESULT " + json.dumps(result), flush=True)
