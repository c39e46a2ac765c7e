"""The streaming checkpoint loader and the safetensors reader/writer."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors.numpy
from mindspore import nn

from stepvideo import layers
from stepvideo.checkpoint import CheckpointError, load_weights, named_parameters, save_sharded, weight_map
from stepvideo.utils import safetensors_io as st
from support import ROOT

rng = np.random.default_rng(7)


class TinyNet(nn.Cell):
    def __init__(self):
        super().__init__()
        self.embed = layers.Embedding(10, 8)
        self.blocks = nn.CellList([layers.Linear(8, 8) for _ in range(3)])
        self.norm = layers.LayerNorm(8)


def random_state(net):
    return {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in named_parameters(net).items()}


def values(net):
    return {k: p.asnumpy() for k, p in named_parameters(net).items()}


def test_safetensors_roundtrip_matches_reference_library(tmp_path):
    tensors = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": np.arange(5, dtype=np.int64),
               "c": rng.standard_normal((2,)).astype(np.float16)}
    st.save_file(tmp_path / "x.safetensors", tensors, metadata={"format": "pt"})
    theirs = safetensors.numpy.load_file(tmp_path / "x.safetensors")
    for k in tensors:
        np.testing.assert_array_equal(theirs[k], tensors[k])
    safetensors.numpy.save_file(tensors, tmp_path / "y.safetensors")
    ours = st.load_file(tmp_path / "y.safetensors")
    for k in tensors:
        np.testing.assert_array_equal(ours[k], tensors[k])


def test_zero_dim_and_huge_shapes(tmp_path):
    st.save_file(tmp_path / "s.safetensors", {"scalar": np.array(4.5, np.float32)})
    out = st.load_file(tmp_path / "s.safetensors")["scalar"]
    assert out.shape == () and out == 4.5
    header = json.dumps({"x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}).encode()
    data = len(header).to_bytes(8, "little") + header + b"\0" * 4
    with pytest.raises(st.SafetensorsError, match="needs 4835703278458516698824704 bytes"):
        st.header_from_bytes(data)


def test_bf16_rounding_and_widening_are_exact():
    x = np.array([1.0, -2.5, 3.14159, 1e-20, 65504.0, np.inf, 1.00390625, 1.01171875], np.float32)
    bits = st.f32_to_bf16_bits(x)
    back = st.bf16_bits_to_f32(bits)
    # round-to-nearest-even reference computed independently in float64
    exp = np.floor(np.log2(np.abs(x[np.isfinite(x)]).astype(np.float64)))
    ulp = 2.0 ** (exp - 7)
    ref = np.round(x[np.isfinite(x)].astype(np.float64) / ulp) * ulp
    np.testing.assert_array_equal(back[np.isfinite(x)], ref.astype(np.float32))
    assert back[5] == np.inf
    # ties go to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> 1
    assert back[6] == 1.0 and back[7] == 1.015625


def test_bytes_roundtrip_keeps_bf16_exact():
    x = rng.standard_normal((4, 3)).astype(np.float32)
    data = st.to_bytes({"x": x, "y": np.ones(2, np.int32)}, bf16=["x"])
    out = st.from_bytes(data)
    assert out["x"][1] == st.BF16 and out["x"][0].dtype == np.uint16
    np.testing.assert_array_equal(out["x"][0], st.f32_to_bf16_bits(x))
    np.testing.assert_array_equal(out["y"][0], np.ones(2, np.int32))


@pytest.mark.parametrize("damage", ["truncated", "bad_header_len", "bad_json", "bad_offsets", "bad_dtype"])
def test_corrupted_files_raise_clear_errors(tmp_path, damage):
    path = tmp_path / "w.safetensors"
    st.save_file(path, {"w": np.ones((64, 64), np.float32)})
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "bad_header_len":
        data[:8] = (10**12).to_bytes(8, "little")
    elif damage == "bad_json":
        data[8:12] = b"\xff\xfe{{"
    else:
        if damage == "bad_offsets":
            header["w"]["data_offsets"] = [0, 12]
        else:
            header["w"]["dtype"] = "F128"
        raw = json.dumps(header).encode()
        raw += b" " * (n - len(raw))
        data[8:8 + n] = raw
    path.write_bytes(bytes(data))
    net = layers.Linear(64, 64, bias=False)
    with pytest.raises(st.SafetensorsError, match=str(path)):
        load_weights(net, path, rename=lambda k: "weight")


def test_strict_load_reports_missing_unexpected_and_wrong_shape_together(tmp_path):
    net = TinyNet()
    state = random_state(net)
    del state["blocks.1.bias"]
    state["blocks.9.weight"] = np.zeros((8, 8), np.float32)
    state["norm.weight"] = np.zeros((9,), np.float32)
    st.save_file(tmp_path / "model.safetensors", state)
    with pytest.raises(CheckpointError) as err:
        load_weights(net, tmp_path)
    msg = str(err.value)
    assert "missing keys (1): ['blocks.1.bias']" in msg
    assert "unexpected keys (1): ['blocks.9.weight']" in msg
    assert "norm.weight: file [9] vs parameter [8]" in msg


def test_bf16_shards_into_fp32_parameters(tmp_path):
    net = TinyNet()
    state = random_state(net)
    save_sharded(state, tmp_path, "model", max_shard_bytes=300, bf16=True)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    report = load_weights(net, tmp_path)
    assert report.tensors == len(state)
    got = values(net)
    for k, v in state.items():
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], st.bf16_bits_to_f32(st.f32_to_bf16_bits(v)))


def test_filtered_load_touches_only_the_selected_parameters(tmp_path):
    net = TinyNet()
    state = random_state(net)
    save_sharded(state, tmp_path, "model", max_shard_bytes=10**6)
    # the file has keys of every block, but only block 1 is expected and loaded
    report = load_weights(net, tmp_path, key_filter=lambda k: k.startswith("blocks.1."))
    assert report.tensors == 2
    np.testing.assert_array_equal(net.blocks[1].weight.asnumpy(), state["blocks.1.weight"])
    assert not np.array_equal(net.blocks[0].weight.asnumpy(), state["blocks.0.weight"])
    # a filter that expects a key the file lacks is still strict
    del state["blocks.1.bias"]
    st.save_file(tmp_path / "partial.safetensors", state)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): \['blocks.1.bias'\]"):
        load_weights(TinyNet(), tmp_path / "partial.safetensors", key_filter=lambda k: k.startswith("blocks.1."))


def test_rename_table(tmp_path):
    lin = layers.Linear(3, 2)
    st.save_file(tmp_path / "w.safetensors", {"old.weight": np.ones((2, 3), np.float32),
                                             "old.bias": np.ones(2, np.float32)})
    load_weights(lin, tmp_path / "w.safetensors", rename=lambda k: k.replace("old.", ""))
    np.testing.assert_array_equal(lin.bias.asnumpy(), np.ones(2, np.float32))


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        weight_map(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="found none"):
        weight_map(tmp_path)
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        weight_map(tmp_path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "/tmp/outside.safetensors",
                                   "./../outside.safetensors", "..\\outside.safetensors", "", 7, None])
def test_index_shard_names_must_stay_inside_the_folder(tmp_path, shard):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    st.save_file(tmp_path / "outside.safetensors", {"a": np.zeros(2, np.float32)})  # exists, but outside
    (folder / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(CheckpointError, match=r"names shard .* expected a file name inside .*ckpt \(relative, "
                                              r"without '\.\.'\)"):
        weight_map(folder)


def test_index_shards_in_a_subfolder_are_fine(tmp_path):
    (tmp_path / "shards").mkdir()
    st.save_file(tmp_path / "shards" / "a.safetensors", {"a": np.zeros(2, np.float32)})
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shards/a.safetensors"}}))
    assert weight_map(tmp_path) == {"a": tmp_path / "shards" / "a.safetensors"}


MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    from mindspore import nn
    from stepvideo import backend, layers
    from stepvideo.checkpoint import load_weights

    def status_kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    backend.init("cpu")
    net = nn.CellList([layers.Linear(2048, 2048, bias=False) for _ in range(24)])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    rss0 = status_kib("VmRSS")
    report = load_weights(net, sys.argv[1])
    print(json.dumps({"grown": status_kib("VmHWM") - rss0, "final": status_kib("VmRSS") - rss0,
                      "bytes": report.bytes}))
""")


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32-file", "bf16-file"])
def test_loading_peak_memory_is_close_to_the_weights(tmp_path, bf16):
    """Peak RSS growth while loading <= 1.3x the loaded tensors (fp32 compute dtype)."""
    w = rng.standard_normal((2048, 2048)).astype(np.float32)
    save_sharded({f"{i}.weight": w for i in range(24)}, tmp_path, "model", max_shard_bytes=100 * 2**20, bf16=bf16)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = probe["grown"] / probe["bytes"]
    # the parameters must really hold the data: the final RSS growth is about the weights
    assert probe["final"] >= 0.95 * probe["bytes"], probe
    print(f"loader peak RSS / loaded bytes ({'bf16' if bf16 else 'fp32'} file): {ratio:.3f} "
          f"({probe['bytes'] / 2**20:.0f} MiB loaded)")
    assert probe["bytes"] == 24 * 2048 * 2048 * 4
    assert ratio <= 1.3


# ------------------------------------------------------------------ slices (tensor parallelism)


def _bytes_read() -> int:
    """Bytes this process has read through read/pread syscalls so far (the kernel's count)."""
    for line in open("/proc/self/io"):
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.parametrize("bf16", [False, True])
def test_read_slice_returns_the_part_of_every_axis(tmp_path, bf16):
    from stepvideo.checkpoint import Slice, read_slice

    full = rng.standard_normal((6, 10, 4)).astype(np.float32)
    st.save_file(tmp_path / "t.safetensors", {"w": full}, bf16=["w"] if bf16 else [])
    with st.SafetensorsFile(tmp_path / "t.safetensors") as f:
        stored = f.read_raw("w")
        info = f.tensors["w"]
    for part, expected in ((Slice(0, 2, 5), stored[2:5]), (Slice(1, 3, 8), stored[:, 3:8]),
                           (Slice(2, 1, 3), stored[:, :, 1:3])):
        got = read_slice(tmp_path / "t.safetensors", info, part)
        assert got.dtype == stored.dtype and got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(CheckpointError, match="does not fit tensor 'w' of shape"):
        read_slice(tmp_path / "t.safetensors", info, Slice(1, 8, 12))


def test_read_slice_reads_only_the_slice(tmp_path):
    from stepvideo.checkpoint import Slice, read_slice

    full = rng.standard_normal((512, 2048)).astype(np.float32)  # 4 MiB
    st.save_file(tmp_path / "big.safetensors", {"w": full})
    with st.SafetensorsFile(tmp_path / "big.safetensors") as f:
        info = f.tensors["w"]
    for part in (Slice(0, 128, 256), Slice(1, 512, 1024)):  # a quarter: rows, then columns (512 runs)
        before = _bytes_read()
        got = read_slice(tmp_path / "big.safetensors", info, part)
        read = _bytes_read() - before
        print(f"slice {tuple(part)}: read {read} bytes for a {got.nbytes}-byte slice of a {full.nbytes}-byte tensor")
        assert got.nbytes <= read <= got.nbytes + 64 * 1024
        np.testing.assert_array_equal(got, full[128:256] if part.axis == 0 else full[:, 512:1024])


def test_load_weights_with_slices_fills_slice_shaped_parameters(tmp_path):
    from stepvideo.checkpoint import Slice

    full = TinyNet()
    state = random_state(full)
    st.save_file(tmp_path / "m.safetensors", state, bf16=list(state))
    net = TinyNet()
    net.blocks[0] = layers.Linear(8, 4)  # rows 4..8 of the stored (8, 8) weight and its bias
    net.blocks[1] = layers.Linear(2, 8, bias=False)  # columns 2..4
    slices = {"blocks.0.weight": Slice(0, 4, 8), "blocks.0.bias": Slice(0, 4, 8), "blocks.1.weight": Slice(1, 2, 4)}
    with pytest.raises(CheckpointError, match="unexpected keys.*blocks.1.bias"):
        load_weights(net, tmp_path / "m.safetensors", slices=slices)
    report = load_weights(net, tmp_path / "m.safetensors", slices=slices,
                          key_filter=lambda name: name != "blocks.1.bias")
    stored = st.load_file(tmp_path / "m.safetensors")
    widened = {k: st.bf16_bits_to_f32(v) if v.dtype == np.uint16 else v for k, v in stored.items()}
    got = values(net)
    np.testing.assert_array_equal(got["blocks.0.weight"], widened["blocks.0.weight"][4:8])
    np.testing.assert_array_equal(got["blocks.0.bias"], widened["blocks.0.bias"][4:8])
    np.testing.assert_array_equal(got["blocks.1.weight"], widened["blocks.1.weight"][:, 2:4])
    np.testing.assert_array_equal(got["blocks.2.weight"], widened["blocks.2.weight"])
    assert report.bytes == sum(v.nbytes for v in got.values())
    with pytest.raises(CheckpointError, match=r"wrong shapes.*blocks.0.weight: file \[3, 8\] vs parameter \[4, 8\]"):
        load_weights(net, tmp_path / "m.safetensors", key_filter=lambda name: name != "blocks.1.bias",
                     slices={**slices, "blocks.0.weight": Slice(0, 5, 8)})
