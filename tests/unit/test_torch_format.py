"""PyTorch checkpoint reader (stepvideo/utils/torch_format.py) and writer (scripts/torch_checkpoint_writer.py), without torch.

The fixture .bin files in golden/convert were written by real `torch.save`.
"""
import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

import torch_checkpoint_writer as writer
from stepvideo.utils import safetensors_io as st
from stepvideo.utils import torch_format as tf
from support import golden

CONVERT = golden("convert")
MARKER = "stepvideo_convert_pwned_marker"


def _expected(name):
    return st.load_file(CONVERT / f"{name}.expected.safetensors")


def _widen(arr, dtype):
    return st.bf16_bits_to_f32(arr) if dtype == "bfloat16" else arr


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("name,fmt", [("clip_plain", "zip"), ("clip_legacy", "legacy"), ("clip_mixed", "zip")])
def test_reads_torch_save_files_exactly(name, fmt):
    expected = _expected(name)
    with tf.TorchCheckpoint(CONVERT / f"{name}.bin") as ckpt:
        assert ckpt.format == fmt
        for key, ref in expected.items():
            arr = ckpt.read(key)
            assert arr.shape == ckpt.tensors[key].shape == ref.shape, key
            assert arr.flags.c_contiguous and arr.flags.writeable
            assert np.array_equal(_widen(arr, ckpt.tensors[key].dtype), ref), key


def test_views_shared_storage_and_transposed_tensor():
    """clip_mixed: q and k are views at offsets into one storage; v is a transposed view."""
    expected = _expected("clip_mixed")
    with tf.TorchCheckpoint(CONVERT / "clip_mixed.bin") as ckpt:
        q = ckpt.tensors["encoder.layer.0.attention.self.query.weight"]
        k = ckpt.tensors["encoder.layer.0.attention.self.key.weight"]
        v = ckpt.tensors["encoder.layer.0.attention.self.value.weight"]
        assert q.storage == k.storage and q.offset != k.offset and q.offset > 0
        assert v.stride == (1, 32)
        dtypes = {ref.dtype for ref in ckpt.tensors.values()}
        assert dtypes == {"bfloat16", "float16", "float32"}
        for ref_name in ("query", "key", "value"):
            key = f"encoder.layer.0.attention.self.{ref_name}.weight"
            assert np.array_equal(ckpt.read(key), expected[key]), key


# --------------------------------------------------------------------------- writing


def test_round_trip_all_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "bf16_from_f32": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "bf16_bits": np.array([0x3F80, 0xC000, 0x7F80, 0x0001], np.uint16),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "mask": np.array([True, False, True]),
        "f64": rng.standard_normal((2, 2)),
        "transposed": rng.standard_normal((4, 6)).astype(np.float32).T,  # non-contiguous input
    }
    bf16 = ["bf16_from_f32", "bf16_bits"]
    path = tmp_path / "pytorch_model.bin"
    writer.save_state_dict(path, tensors, bf16=bf16)
    with tf.TorchCheckpoint(path) as ckpt:
        assert list(ckpt.keys()) == list(tensors)  # order preserved
        for name, arr in tensors.items():
            got = ckpt.read(name)
            dtype = ckpt.tensors[name].dtype
            if name in bf16:
                assert dtype == "bfloat16"
                want = arr if arr.dtype == np.uint16 else st.f32_to_bf16_bits(arr)
                assert got.dtype == np.uint16
                # bf16 of a float32 is that float32 with the low 16 bits rounded away
                if arr.dtype == np.float32:
                    assert np.all(np.abs(st.bf16_bits_to_f32(got) - arr) <= np.abs(arr) * 2.0 ** -8)
            else:
                want = arr
                assert got.dtype == arr.dtype, name
            assert got.shape == arr.shape and np.array_equal(got, want), name
    assert sorted(os.listdir(tmp_path)) == ["pytorch_model.bin"]  # no temporary left over


def _mask_serialization_id(data: bytes) -> bytes:
    """Zero the one record torch fills with random digits, and its two CRC fields."""
    buf = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/.data/serialization_id"))
    name_len, extra_len = struct.unpack("<HH", buf[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    buf[start:start + info.file_size] = bytes(info.file_size)
    buf[start + info.file_size + 4:start + info.file_size + 8] = bytes(4)  # data descriptor CRC
    central = data.rfind(b"PK\x01\x02")  # the id is the last central directory entry
    buf[central + 16:central + 20] = bytes(4)
    return bytes(buf)


@pytest.mark.parametrize("name", ["clip_plain", "clip_prefixed", "clip_wrong_shape"])
def test_writer_reproduces_torch_save_byte_for_byte(tmp_path, name):
    """Rewriting a torch.save file's tensors gives the same archive (members, order, 64-byte
    alignment, pickle opcodes, zip64 trailer), except torch's random serialization id."""
    source = CONVERT / f"{name}.bin"
    with tf.TorchCheckpoint(source) as ckpt:
        tensors = dict(ckpt.items())
        bf16 = [k for k, r in ckpt.tensors.items() if r.dtype == "bfloat16"]
    out = tmp_path / f"{name}.bin"
    writer.save_state_dict(out, tensors, bf16=bf16)
    ours, theirs = out.read_bytes(), source.read_bytes()
    with zipfile.ZipFile(out) as a, zipfile.ZipFile(source) as b:
        layout = lambda z: [(i.filename, i.header_offset, i.file_size, i.compress_type) for i in z.infolist()]
        assert layout(a) == layout(b)
        assert a.read(f"{name}/data.pkl") == b.read(f"{name}/data.pkl")
    assert len(ours) == len(theirs)
    assert _mask_serialization_id(ours) == _mask_serialization_id(theirs)


def test_writer_layout_matches_fixture_archives(tmp_path):
    """Member names and order as torch.save writes them; every record's data 64-byte aligned."""
    path = tmp_path / "tiny.bin"
    writer.save_state_dict(path, {"a": np.ones((2, 2), np.float32), "b": np.zeros(3, np.float16)})
    with zipfile.ZipFile(path) as ours, zipfile.ZipFile(CONVERT / "clip_mixed.bin") as fixture:
        strip = lambda z: [i.filename.split("/", 1)[1] for i in z.infolist() if "/data/" not in i.filename]
        assert strip(ours) == strip(fixture)
        for z in (ours, fixture):
            for info in z.infolist():
                raw = z.fp
                raw.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", raw.read(4))
                assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
        for record in ("byteorder", "version", ".format_version", ".storage_alignment"):
            assert ours.read(f"tiny/{record}") == fixture.read(f"clip_mixed/{record}")
    assert path.read_bytes() != b""  # and it reads back
    assert tf.load_state_dict(path)["b"][1] == "float16"


def test_writer_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(tf.TorchFormatError, match="'c'.*complex"):
        writer.save_state_dict(tmp_path / "x.bin", {"c": np.zeros(2, np.complex64)})
    assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------- refusing


def _zip_with_pickle(path, pickled: bytes, storages=()):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickled)
        for key, data in storages:
            z.writestr(f"archive/data/{key}", data)


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _hostile_pickles():
    """Pickles that run `touch MARKER` when loaded without restrictions (checked once by hand with
    plain pickle), through several opcodes; and one that would call builtins.eval."""
    yield "fixture", None
    for protocol in (0, 2, 4, 5):  # GLOBAL (0, 2) and STACK_GLOBAL (4, 5)
        yield f"reduce-p{protocol}", pickle.dumps({"w": _RunsCommand(f"touch {MARKER}")}, protocol=protocol)
    yield "inst", b"(S'touch " + MARKER.encode() + b"'\nios\nsystem\n."  # INST opcode
    yield "builtins-eval", b"\x80\x02cbuiltins\neval\nX\x0c\x00\x00\x00__import__()\x85R."


@pytest.mark.parametrize("label,pickled", list(_hostile_pickles()), ids=lambda v: v if isinstance(v, str) else "")
def test_hostile_pickles_are_refused_and_never_run(in_tmp, label, pickled):
    if pickled is None:
        path = CONVERT / "malicious.bin"
    else:
        path = in_tmp / "hostile.bin"
        _zip_with_pickle(path, pickled)
    with pytest.raises(tf.UnsafeCheckpointError, match="refusing to unpickle global '(posix|os|builtins)"):
        tf.TorchCheckpoint(path)
    assert not (in_tmp / MARKER).exists()
    assert not (CONVERT / MARKER).exists()


def test_hostile_legacy_pickle_is_refused(in_tmp):
    path = in_tmp / "legacy.bin"
    path.write_bytes(pickle.dumps(_RunsCommand(f"touch {MARKER}"), protocol=2))
    with pytest.raises(tf.UnsafeCheckpointError, match="posix.system|os.system"):
        tf.TorchCheckpoint(path)
    assert not (in_tmp / MARKER).exists()


def test_truncated_zip_fixture():
    with pytest.raises(tf.TorchFormatError, match="truncated or corrupted"):
        tf.TorchCheckpoint(CONVERT / "truncated.bin")


@pytest.mark.parametrize("fraction", [0.01, 0.04, 0.5, 0.999])
def test_truncated_legacy_file(tmp_path, fraction):
    data = (CONVERT / "clip_legacy.bin").read_bytes()
    path = tmp_path / "cut.bin"
    path.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(tf.TorchFormatError, match="cut.bin"):
        with tf.TorchCheckpoint(path) as ckpt:
            for name in ckpt.keys():
                ckpt.read(name)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.bin"
    path.write_bytes(b"hello, not a pickle")
    with pytest.raises(tf.TorchFormatError, match="neither a zip archive nor a legacy torch pickle"):
        tf.TorchCheckpoint(path)


def _one_tensor_pickle(tmp_path):
    """data.pkl of a real writer output holding one (2, 3) float32 tensor in storage '0'."""
    writer.save_state_dict(tmp_path / "one.bin", {"w": np.zeros((2, 3), np.float32)})
    with zipfile.ZipFile(tmp_path / "one.bin") as z:
        return z.read("one/data.pkl")


def test_view_outside_its_storage_is_refused(tmp_path):
    pickled = _one_tensor_pickle(tmp_path)
    assert pickled.count(b"K\x02K\x03\x86") == 1  # the size tuple (2, 3)
    bad = pickled.replace(b"K\x02K\x03\x86", b"K\x03K\x03\x86")  # (3, 3) needs 9 of the 6 elements
    _zip_with_pickle(tmp_path / "bad.bin", bad, [("0", bytes(24))])
    with pytest.raises(tf.TorchFormatError, match="reaches element 8 of storage '0', which has 6 elements"):
        tf.TorchCheckpoint(tmp_path / "bad.bin")


def test_storage_record_size_and_presence_are_checked(tmp_path):
    pickled = _one_tensor_pickle(tmp_path)
    _zip_with_pickle(tmp_path / "short.bin", pickled, [("0", bytes(20))])
    with pytest.raises(tf.TorchFormatError, match="storage '0' holds 20 bytes, expected 24"):
        tf.TorchCheckpoint(tmp_path / "short.bin")
    _zip_with_pickle(tmp_path / "none.bin", pickled)
    with pytest.raises(tf.TorchFormatError, match="storage '0' has no record 'archive/data/0'"):
        tf.TorchCheckpoint(tmp_path / "none.bin")


def test_non_tensor_entries_are_rejected(tmp_path):
    _zip_with_pickle(tmp_path / "odd.bin", pickle.dumps({"epoch": 3}, protocol=2))
    with pytest.raises(tf.TorchFormatError, match="entry 'epoch' is a int"):
        tf.TorchCheckpoint(tmp_path / "odd.bin")
