"""Several run_parallel.py jobs, one after another, in one process (of an msrun launch, or alone).

    msrun --worker_num=N ... batch_worker.py RUNS.json        (or: python batch_worker.py RUNS.json)

RUNS.json: [{"name": ..., "argv": [run_parallel.py flags]}, ...]. Each run is `stepvideo.job.main(argv)`:
it joins the job (MindSpore's `init` and `new_group` return the existing job and group when called
again), builds its own mesh, collectives and model, and writes its own outputs. Compiled graphs are
cached per model instance and input shapes, so a run never executes another run's graphs.
Between a run's lines `=== batch run NAME` and `=== batch end NAME (...)`. A failing run ends the
process with its exit code (under msrun, at once: job.main leaves with os._exit) and no later run starts.
"""
import json
import sys
import time
from pathlib import Path

from stepvideo import job

BEGIN, END = "=== batch run", "=== batch end"  # as tests/msrun_support.py reads them


def main(spec: Path) -> int:
    for run in json.loads(spec.read_text()):
        print(f"{BEGIN} {run['name']}", flush=True)
        started = time.monotonic()
        code = job.main(run["argv"])
        print(f"{END} {run['name']} (exit code {code} after {time.monotonic() - started:.1f} s)", flush=True)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
