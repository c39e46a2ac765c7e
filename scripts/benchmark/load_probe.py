"""Load a transformer/ folder in a fresh process; print the peak and final RSS growth as JSON.

    python load_probe.py <transformer folder> <repository root>

Run by `benchmark load`: the model is built lazily, the peak-RSS counter reset
(/proc/self/clear_refs), then the shards are streamed with `load_weights`.
"""
import json
import sys
import time

sys.path.insert(0, sys.argv[2])
from stepvideo import backend
backend.init("cpu")
from stepvideo.modules.model import StepVideoModel
from stepvideo.checkpoint import load_weights, read_config

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

model = StepVideoModel.from_config_dict(read_config(sys.argv[1]))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
rss0 = status("VmRSS")
t = time.perf_counter()
report = load_weights(model, sys.argv[1])
seconds = time.perf_counter() - t
print(json.dumps({"peak": status("VmHWM") - rss0, "final": status("VmRSS") - rss0, "bytes": report.bytes,
                  "tensors": report.tensors, "seconds": seconds}))
