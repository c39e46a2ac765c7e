"""Timing against a reference GEMM, the machine line, Markdown tables and synthetic weights."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np

from synthetic_weights import rule_tensor

GEMM_SHAPE = (2048, 1024, 4096)  # (m, k, n) of the reference GEMM
GEMMS_PER_RUN = 3  # reference GEMMs timed before each model run


def load_average() -> float:
    return os.getloadavg()[0]


def machine_line(what: str) -> str:
    import mindspore as ms
    return (f"`benchmark {what}` on {datetime.date.today().isoformat()}: "
            f"{os.cpu_count()} CPU(s) {platform.processor() or platform.machine()}, MindSpore {ms.__version__}, "
            f"load average {load_average():.2f} at start")


class GemmReference:
    """The machine's fp32 GEMM rate, measured next to each model run."""

    def __init__(self):
        from mindspore import Tensor
        rng = np.random.default_rng(0)
        m, k, n = GEMM_SHAPE
        self.a = Tensor(rng.standard_normal((m, k), dtype=np.float32))
        self.b = Tensor(rng.standard_normal((k, n), dtype=np.float32))
        self.flops = 2.0 * m * k * n

    def run(self) -> float:
        from mindspore import ops
        t = time.perf_counter()
        ops.matmul(self.a, self.b).asnumpy()
        return time.perf_counter() - t


def sync(out):
    """Wait for a model output (the first tensor of nested tuples/lists/dicts)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    out.asnumpy()


@dataclass
class Timing:
    seconds: List[float]
    gemm_seconds: List[float] = field(default_factory=list)
    first_call: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    def gemm_rate(self, gemm: GemmReference) -> float:
        return gemm.flops / statistics.median(self.gemm_seconds)

    def best_gemm_rate(self, gemm: GemmReference) -> float:
        return gemm.flops / min(self.gemm_seconds)

    def fractions(self, flops: float, gemm: GemmReference) -> str:
        """'median / best' model run against the machine's GEMM rate (the fastest reference GEMM: other
        processes share the cores, and a disturbed reference would flatter the model)."""
        ref = self.best_gemm_rate(gemm)
        return f"{flops / self.median / ref:.0%} / {flops / self.best / ref:.0%}"


def measure(fn: Callable[[], object], repeats: int, warmup: int, gemm: Optional[GemmReference]) -> Timing:
    t = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - t
    for _ in range(warmup - 1):
        sync(fn())
    timing = Timing(seconds=[], first_call=first)
    for _ in range(repeats):
        if gemm is not None:
            timing.gemm_seconds += [gemm.run() for _ in range(GEMMS_PER_RUN)]
        t = time.perf_counter()
        sync(fn())
        timing.seconds.append(time.perf_counter() - t)
    return timing


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fill_synthetic(net, salt: str = "benchmark:", skip: Sequence[str] = ()) -> int:
    """Weights by the golden rule (`synthetic_weights`), parameter by parameter; returns their bytes.

    Parameters whose names start with one of `skip` keep their (lazy) initial values.
    """
    from mindspore import Tensor

    total = 0
    for name, p in net.parameters_and_names():
        if name.startswith(tuple(skip)):
            continue
        w = rule_tensor(name, p.shape, salt=salt)
        p.set_data(Tensor.from_numpy(w))
        total += w.nbytes
    return total


@contextlib.contextmanager
def stdout_to_stderr():
    """Send this process's (and its children's) stdout to stderr, e.g. a library's progress output."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
