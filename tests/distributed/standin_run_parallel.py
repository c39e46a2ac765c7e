"""run_parallel.py with the Ascend kernel table on the CPU (stand-ins for the Ascend-only calls and the
HCCL all_to_all / send / recv); prints the table's name and how often each stand-in collective ran."""
import runpy
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

import ascend_standins  # noqa: E402
from stepvideo import backend  # noqa: E402

if __name__ == "__main__":
    backend.init("cpu")
    table = ascend_standins.ascend_table()
    backend.install(table)
    sys.argv = [str(TESTS.parent / "run_parallel.py")] + sys.argv[1:]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as done:
        print(f"kernel table {backend.info().kernels}; stand-in collectives {table.comm.calls}", flush=True)
        raise done
