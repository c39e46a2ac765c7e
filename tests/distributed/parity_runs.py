"""The run_parallel.py runs whose final latents the parity tests compare (test_parallel_dit.py and
test_tensor_cfg_parallel.py), started together: every run with the same number of workers runs, in the
order below, in the processes of one msrun launch, and the single-process runs in one plain process
(tests/distributed/batch_worker.py). Each run is still a whole job with its own mesh, model and outputs;
only the processes (MindSpore's import, the job's start-up) are shared.

All runs: the tiny checkpoint (6 heads; 6 or 3 DiT blocks), the same prompt and seed, 2 steps, rank 0
writing the final latents; compiled unless the flags say --eager.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, List

import numpy as np

from msrun_support import Job, Launches
from stepvideo.utils import safetensors_io as st

PROMPT = "A cat walks on the grass, realistic style."
STEPS = 2
VIDEOS = {  # name -> (num_frames, height, width) flags; 1 frame gives 1 latent frame
    "A": ("1", "80", "112"),  # 5 x 7 latents = 35 tokens (no Ulysses degree divides it: padding)
    "C": ("1", "32", "80"),  # 2 x 5 latents = 10 tokens (divisible by 2)
}
RUNS = {  # name -> (DiT blocks, video, workers (0: one plain process, no msrun), flags)
    # test_parallel_dit.py
    "single_A": (6, "A", 0, ("--ulysses_degree", "1")),
    "single_C": (6, "C", 0, ("--ulysses_degree", "1")),
    "single_A_eager": (6, "A", 0, ("--ulysses_degree", "1", "--eager")),
    "sp2": (6, "C", 2, ("--ulysses_degree", "2", "--pp_degree", "1")),
    "sp3": (6, "A", 3, ("--ulysses_degree", "3", "--pp_degree", "1")),
    "pp3_uneven": (6, "A", 3, ("--ulysses_degree", "1", "--pp_degree", "3", "--layer_split", "1,3,2")),
    # first in its launch: its weight-memory bound reads the RSS growth of a fresh process
    "sp2pp2": (6, "A", 4, ("--ulysses_degree", "2", "--pp_degree", "2")),
    # test_tensor_cfg_parallel.py
    "single_3_blocks": (3, "A", 0, ("--ulysses_degree", "1", "--eager")),
    "tp2": (3, "A", 2, ("--ulysses_degree", "1", "--tensor_parallel_degree", "2")),
    "tp3": (3, "A", 3, ("--ulysses_degree", "1", "--tensor_parallel_degree", "3", "--eager")),
    "tp2_sp3": (3, "A", 6, ("--ulysses_degree", "3", "--tensor_parallel_degree", "2")),  # Ulysses between halves
    "tp2_pp2": (3, "A", 4, ("--ulysses_degree", "1", "--tensor_parallel_degree", "2", "--pp_degree", "2",
                            "--eager")),
    "cfg2": (3, "A", 2, ("--ulysses_degree", "1", "--cfg_parallel_degree", "2", "--eager")),
    "cfg2_pp2": (3, "A", 4, ("--ulysses_degree", "1", "--cfg_parallel_degree", "2", "--pp_degree", "2", "--eager")),
    "cfg2_tp2": (3, "A", 4, ("--ulysses_degree", "1", "--cfg_parallel_degree", "2", "--tensor_parallel_degree", "2",
                             "--eager")),
}


def run_args(model_dir: Path, video: str, latents: Path, *flags: str, stats: Path = None) -> list:
    """run_parallel.py's flags for `video` on `model_dir`, the final latents written to `latents`."""
    frames, height, width = VIDEOS[video]
    args = ["--model_dir", str(model_dir), "--local_models", "--prompt", PROMPT, "--infer_steps", str(STEPS),
            "--num_frames", frames, "--height", height, "--width", width, "--seed", "42",
            "--output_type", "latent", "--latents_out", str(latents), "--device", "cpu", *flags]
    return args + (["--stats_dir", str(stats)] if stats else [])


class ParityRuns:
    """Every run of RUNS in `workdir`; a launch starts when a test first asks for one of its runs.

    checkpoint(blocks) -> the tiny model folder with that many DiT blocks.
    """

    def __init__(self, workdir: Path, checkpoint: Callable[[int], Path]):
        self.workdir = workdir
        self.launches = Launches({name: (workers, run_args(checkpoint(blocks), video, self._latents(name), *flags,
                                                           stats=self.stats_dir(name) if workers else None))
                                  for name, (blocks, video, workers, flags) in RUNS.items()}, workdir)

    def _latents(self, name: str) -> Path:
        return self.workdir / f"{name}.safetensors"

    def stats_dir(self, name: str) -> Path:
        return self.workdir / f"stats_{name}"

    def job(self, name: str) -> Job:
        """The launch that ran `name` (it must have succeeded)."""
        job = self.launches(RUNS[name][2])
        assert job.returncode == 0, job.console[-5000:]
        return job

    def latents(self, name: str) -> np.ndarray:
        self.job(name)
        return st.load_file(self._latents(name))["latents"]

    def stats(self, name: str) -> List[dict]:
        """Each rank's --stats_dir JSON, by rank."""
        self.job(name)
        return [json.loads((self.stats_dir(name) / f"rank{r}.json").read_text()) for r in range(RUNS[name][2])]
