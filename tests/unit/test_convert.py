"""convert.py (HunyuanCLIP pytorch_model.bin -> model.safetensors) on every golden/convert fixture."""
import os
import subprocess
import sys

import numpy as np
import pytest

import convert
from stepvideo.utils import safetensors_io as st
from stepvideo.utils.torch_format import TorchCheckpoint, TorchFormatError, UnsafeCheckpointError
from support import ROOT, cases, golden

CONVERT = golden("convert")
CONFIG = CONVERT / "config.json"
CASES = cases("convert")
GOOD = sorted(n for n, c in CASES.items() if c["expect"] == "ok")
BAD = sorted(n for n, c in CASES.items() if c["expect"] == "error")
MARKER = "stepvideo_convert_pwned_marker"


def _stored(path):
    """name -> (array as stored, safetensors dtype) of a written file."""
    return st.from_bytes(path.read_bytes(), str(path))


def _converted(tmp_path, bin_name, **options):
    """(summary, what was written as `_stored` gives it, the fixture's expected tensors) of converting `bin_name`."""
    out = tmp_path / "model.safetensors"
    summary = convert.convert(str(CONVERT / bin_name), str(out), str(CONFIG), **options)
    return summary, _stored(out), st.load_file(CONVERT / bin_name.replace(".bin", ".expected.safetensors"))


def _source_dtypes(bin_name):
    with TorchCheckpoint(CONVERT / bin_name) as ckpt:
        return {(n[len("bert."):] if n.startswith("bert.") else n): r.dtype for n, r in ckpt.tensors.items()}


@pytest.mark.parametrize("bin_name", GOOD)
def test_good_checkpoints_convert_exactly(tmp_path, bin_name):
    case = CASES[bin_name]
    summary, stored, expected = _converted(tmp_path, bin_name)
    assert sorted(stored) == sorted(expected)
    assert sorted(summary.dropped) == sorted(case["dropped"])
    assert sorted(summary.source_dtypes) == sorted(case["dtypes"])
    assert summary.stripped_prefix == (len(expected) if case["prefix"] else 0)
    source_dtypes = _source_dtypes(bin_name)
    safetensors_dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
    for name, ref in expected.items():
        arr, dtype = stored[name]
        assert dtype == safetensors_dtype[source_dtypes[name]], f"{name}: dtype not preserved"
        value = st.bf16_bits_to_f32(arr) if dtype == "BF16" else arr  # exact widening
        assert value.shape == ref.shape and value.dtype == ref.dtype, name
        assert np.array_equal(value, ref), f"{name}: values differ"
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_dtype_float32_widens_exactly(tmp_path):
    _, stored, expected = _converted(tmp_path, "clip_mixed.bin", dtype="float32")
    for name, (arr, dtype) in stored.items():
        assert dtype == "F32"
        assert np.array_equal(arr, expected[name].astype(np.float32)), name


def test_dtype_bfloat16_rounds_to_nearest(tmp_path):
    _, stored, expected = _converted(tmp_path, "clip_plain.bin", dtype="bfloat16")
    for name, (bits, dtype) in stored.items():
        assert dtype == "BF16"
        value = (bits.astype(np.uint32) << 16).view(np.float32)
        ref = expected[name]
        # within half a bf16 ulp (8 significant bits) of the float32 value
        assert np.all(np.abs(value - ref) <= np.abs(ref) * 2.0 ** -8), name


@pytest.mark.parametrize("bin_name", BAD)
def test_bad_checkpoints_fail_clearly_without_output(in_tmp, bin_name):
    case = CASES[bin_name]
    out = in_tmp / "model.safetensors"
    error = UnsafeCheckpointError if bin_name == "malicious.bin" else (convert.ConvertError, TorchFormatError)
    with pytest.raises(error) as info:
        convert.convert(str(CONVERT / bin_name), str(out), str(CONFIG))
    message = str(info.value)
    assert bin_name in message
    if "error_mentions" in case:
        assert case["error_mentions"] in message
    assert os.listdir(in_tmp) == []  # no output, no temporary, no marker
    assert not (CONVERT / MARKER).exists()


def test_existing_output_is_left_alone_on_error(tmp_path):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"previous")
    with pytest.raises(convert.ConvertError):
        convert.convert(str(CONVERT / "clip_wrong_shape.bin"), str(out), str(CONFIG))
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["model.safetensors"]


def test_expected_key_table_follows_config():
    config = {"hidden_size": 8, "num_hidden_layers": 3, "intermediate_size": 16, "vocab_size": 11,
              "max_position_embeddings": 7, "type_vocab_size": 2}
    shapes = convert.bert_expected_shapes(config)
    assert len(shapes) == 5 + 16 * 3 + 2
    assert shapes["encoder.layer.2.intermediate.dense.weight"] == (16, 8)
    assert shapes["encoder.layer.2.output.dense.weight"] == (8, 16)
    assert shapes["embeddings.position_embeddings.weight"] == (7, 8)
    assert "embeddings.position_ids" not in shapes  # a non-persistent buffer in BertModel
    with pytest.raises(convert.ConvertError, match="intermediate_size"):
        convert.bert_expected_shapes({k: v for k, v in config.items() if k != "intermediate_size"})


# --------------------------------------------------------------------------- the real CLI


def _run_cli(cwd, *args):
    return subprocess.run([sys.executable, str(ROOT / "convert.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_good_file_keeps_bf16(tmp_path):
    out = tmp_path / "model.safetensors"
    run = _run_cli(tmp_path, "--pt_filename", CONVERT / "clip_mixed.bin", "--sf_filename", out,
                   "--config_path", CONFIG)
    assert run.returncode == 0, run.stderr
    assert "kept 39 BertModel tensors" in run.stdout
    assert "dropped 5 keys" in run.stdout and "visual.conv1.weight" in run.stdout
    assert "bfloat16 x12" in run.stdout
    dtypes = {d for _, d in _stored(out).values()}
    assert dtypes == {"BF16", "F16", "F32"}


@pytest.mark.parametrize("bin_name,mentions", [
    ("clip_missing_key.bin", "encoder.layer.1.output.dense.weight"),
    ("malicious.bin", "refusing to unpickle global 'posix.system'"),
    ("truncated.bin", "truncated or corrupted"),
])
def test_cli_bad_file_one_line_error(tmp_path, bin_name, mentions):
    out = tmp_path / "model.safetensors"
    run = _run_cli(tmp_path, "--pt_filename", CONVERT / bin_name, "--sf_filename", out, "--config_path", CONFIG)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith("convert.py: error:") and mentions in lines[0]
    assert run.stdout == ""
    assert os.listdir(tmp_path) == []
    assert not (CONVERT / MARKER).exists()
