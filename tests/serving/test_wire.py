"""The wire format: exact round trips (bf16 as raw bits) and header-only validation with clear errors."""
import json
import math
import struct

import mindspore as ms
import numpy as np
import pytest

from stepvideo.serving import wire
from stepvideo.serving.server import Limits
from stepvideo.utils import safetensors_io as st

SAMPLES = Limits().samples_spec(64)


def header_of(payload: bytes) -> dict:
    (n,) = struct.unpack_from("<Q", payload)
    return json.loads(payload[8:8 + n])


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def spec_for(name: str, arr: np.ndarray, dtype: str) -> wire.TensorSpec:
    return wire.TensorSpec(name, tuple(f"d{i}" for i in range(arr.ndim)), (dtype,), min_size=0)


def test_round_trip_is_bit_exact_for_every_dtype():
    rng = np.random.default_rng(0)
    bf16_valued = st.bf16_bits_to_f32(st.f32_to_bf16_bits(rng.standard_normal((2, 3, 5)).astype(np.float32)))
    special = np.array([0x7FC00000, 0xFF800000, 0x7F800000, 0x80000000, 0x00010000], np.uint32).view(np.float32)
    odd_nan = np.array([0x7FC00001, 1.0], np.float32)
    odd_nan[0:1].view(np.uint32)[0] = 0x7FC00001
    tensors = {
        ("fp32", "F32"): rng.standard_normal((2, 3, 4)).astype(np.float32),
        ("bf16_valued", "BF16"): bf16_valued,  # halves the bytes, loses nothing
        ("special", "BF16"): special,  # NaN, +-inf, -0, a bf16 subnormal keep their bits
        ("odd_nan", "F32"): odd_nan,  # a NaN payload in the low half forces F32
        ("mask", "I64"): np.array([[1, 1, 0], [1, 0, 0]], np.int64),
        ("ids", "I32"): np.arange(6, dtype=np.int32).reshape(2, 3),
        ("flags", "BOOL"): np.array([True, False]),
        ("bytes", "U8"): np.arange(4, dtype=np.uint8),
        ("half", "F16"): rng.standard_normal(7).astype(np.float16),
        ("double", "F64"): rng.standard_normal(3),
        ("scalar", "F32"): np.array(1.2345678, np.float32),
        ("transposed", "F32"): rng.standard_normal((4, 3)).astype(np.float32).T,
        ("big_endian", "F32"): rng.standard_normal(5).astype(">f4"),
    }
    payload = wire.encode({name: arr for (name, _), arr in tensors.items()})
    header = header_of(payload)
    assert {name: header[name]["dtype"] for name, _ in tensors} == {name: dt for name, dt in tensors}
    out = wire.decode(payload, [spec_for(name, arr, dt) for (name, dt), arr in tensors.items()])
    for (name, _), arr in tensors.items():
        want = arr.astype(arr.dtype.newbyteorder("="), order="C")
        assert same_bits(out[name], want), name


def test_mindspore_bf16_arrays_travel_as_their_bits():
    t = ms.Tensor(np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)).astype(ms.bfloat16)
    payload = wire.encode({"v": t.asnumpy()})
    assert header_of(payload)["v"]["dtype"] == "BF16"
    out = wire.decode(payload, [wire.TensorSpec("v", ("a", "b"), ("BF16",))])["v"]
    assert same_bits(out, t.astype(ms.float32).asnumpy())


def test_layout_is_the_foundation_writer_layout():
    rng = np.random.default_rng(2)
    bf = st.bf16_bits_to_f32(st.f32_to_bf16_bits(rng.standard_normal((2, 5)).astype(np.float32)))
    tensors = {"y": rng.standard_normal((2, 3, 4)).astype(np.float32), "y_mask": np.ones((2, 7), np.int64),
               "clip_embedding": bf}
    assert wire.encode(tensors) == st.to_bytes(tensors, bf16=["clip_embedding"])
    total, parts = wire.encode_parts(tensors)
    assert total == len(wire.encode(tensors)) and b"".join(wire.iter_chunks(parts, 7)) == wire.encode(tensors)


def test_decode_gives_views_of_a_bytearray_and_copies_of_bytes():
    z = np.arange(24, dtype=np.float32).reshape(1, 1, 2, 3, 4) + 0.1
    spec = wire.TensorSpec("samples", ("b", "T", "c", "h", "w"), ("F32",))
    payload = wire.encode({"samples": z})
    view = wire.decode(bytearray(payload), [spec])["samples"]
    copy = wire.decode(payload, [spec])["samples"]
    assert view.base is not None and view.flags.writeable and copy.flags.writeable
    assert same_bits(view, z) and same_bits(copy, z)


def test_unsendable_dtypes_are_named():
    with pytest.raises(wire.WireError, match="'c'.*complex128 cannot be sent"):
        wire.encode({"c": np.zeros(2, np.complex128)})
    with pytest.raises(wire.WireError, match="'x': expected a numpy array, got list"):
        wire.encode({"x": [1.0]})


def raw_payload(header: dict, data: bytes = b"", header_len=None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def entry(shape, dtype="F32", offsets=None):
    """A header entry and matching zero data (no data when the shape is absurd)."""
    n = math.prod(shape) if all(type(d) is int and d >= 0 for d in shape) else 0
    size = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8}.get(dtype, 4) * n
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets or [0, size]}, b"\0" * min(size, 2**24)


@pytest.mark.parametrize("shape, dtype, message", [
    ([1, 3, 64, 2, 2], "I64", "dtype 'I64', expected F32/BF16/F16"),
    ([1, 3, 64, 2], "F32", "rank 4 .*expected rank 5"),
    ([1, 3, 63, 2, 2], "F32", "axis c has size 63, expected 64"),
    ([5, 3, 64, 2, 2], "F32", "axis b has size 5, larger than the limit 4"),
    ([1, 55, 64, 2, 2], "F32", "axis T has size 55, larger than the limit 54"),
    ([1, 3, 64, 65, 2], "F32", "axis h has size 65, larger than the limit 64"),
    ([1, 3, 64, 0, 2], "F32", "axis h has size 0, expected at least 1"),
    ([1, -3, 64, 2, 2], "F32", "axis T has size -3, expected at least 1"),
    ([1, 3, 64, 2, 2 ** 64], "F32", "axis w has size 18446744073709551616, larger than the limit 64"),
    ([1, 3, 64, 2, 1.5], "F32", "not a list of integers"),
    ([1, 3, 64, 2, True], "F32", "not a list of integers"),
    ("1,3,64,2,2", "F32", "not a list of integers"),
])
def test_samples_spec_errors_name_what_was_expected(shape, dtype, message):
    meta, data = entry(shape, dtype)
    with pytest.raises(wire.WireError, match=message) as e:
        wire.decode(raw_payload({"samples": meta}, data), [SAMPLES])
    assert "'samples' of shape (b<=4, T<=54, 64, h<=64, w<=64)" in str(e.value)


def test_total_element_limit():
    meta, data = entry([4, 54, 64, 16, 16])
    with pytest.raises(wire.WireError, match="3538944 elements in all, larger than the limit 1000"):
        wire.decode(raw_payload({"samples": meta}, data), [SAMPLES], max_elements=1000)


@pytest.mark.parametrize("payload, message", [
    (b"", "0 bytes; a safetensors payload starts with an 8-byte header length"),
    (b"\x01\x02", "2 bytes"),
    (struct.pack("<Q", 2 ** 64 - 1) + b"{}", "exceeds the limit of 65536 bytes"),
    (struct.pack("<Q", 100) + b"{}", "header length 100 does not fit in 10 bytes"),
    (struct.pack("<Q", 2) + b"\xff\xfe", "not valid UTF-8 JSON"),
    (struct.pack("<Q", 3) + b"{x}", "not valid UTF-8 JSON"),
    (struct.pack("<Q", 2) + b"[]", "must be a JSON object, got list"),
    (raw_payload({"samples": [1, 2]}), "entry 'samples' must be an object"),
    (raw_payload({}), r"expected tensors \['samples'\], got \[\]; missing \['samples'\]"),
    (raw_payload({"samples": entry([1, 1, 64, 1, 1])[0], "extra": entry([1])[0]}, b"\0" * 260),
     r"unexpected \['extra'\]"),
    (raw_payload({"latents": entry([1, 1, 64, 1, 1])[0]}, b"\0" * 256), r"missing \['samples'\]; unexpected"),
    (raw_payload({"samples": entry([1, 1, 64, 1, 1])[0]}, b"\0" * 200), "data section has 200 bytes"),
    (raw_payload({"samples": entry([1, 1, 64, 1, 1])[0]}, b"\0" * 300), "44 bytes after the last tensor"),
    (raw_payload({"samples": entry([1, 1, 64, 1, 1], offsets=[4, 260])[0]}, b"\0" * 260),
     "starts at byte .*expected"),
    (raw_payload({"samples": {"dtype": "F32", "shape": [1, 1, 64, 1, 1]}}, b"\0" * 256),
     "lacks dtype/shape/data_offsets"),
])
def test_malformed_payloads(payload, message):
    with pytest.raises(wire.WireError, match=message):
        wire.decode(payload, [SAMPLES])


def test_default_limits_fit_a_204_frame_544x992_latent():
    """(1, 36, 64, 34, 62) float32 latents: accepted by the spec and under the default body limit."""
    z = np.random.default_rng(3).standard_normal((1, 36, 64, 34, 62)).astype(np.float32)
    total, _ = wire.encode_parts({"samples": z})
    limits = Limits()
    assert total <= limits.max_body_bytes / 3, (total, limits.max_body_bytes)  # margin: 3x
    payload = wire.encode({"samples": z})
    out = wire.decode(bytearray(payload), [limits.samples_spec(64)], max_elements=limits.max_latent_elements)
    assert same_bits(out["samples"], z)


def test_prompts_round_trip():
    prompts = ["一名宇航员在月球上发现一块石碑，上面印有“stepfun”字样", "", "café 🙂", "a\nb\"c\\"]
    assert wire.decode_prompts(wire.encode_prompts(prompts), max_prompts=4, max_prompt_chars=100) == prompts


@pytest.mark.parametrize("body, message", [
    (b"\xff\xfe{", "not valid UTF-8"),
    ('{"prompts": ["café"]}'.encode("latin-1"), "not valid UTF-8"),
    (b"", "not valid JSON"),
    (b"{'prompts': ['a']}", "not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
    (b'["a"]', 'exactly the key "prompts", got list'),
    (b'{"prompt": ["a"]}', r"keys \['prompt'\]"),
    (b'{"prompts": ["a"], "x": 1}', r"keys \['prompts', 'x'\]"),
    (b'{"prompts": "a"}', "non-empty list of strings, got str"),
    (b'{"prompts": []}', r"got list \(empty\)"),
    (b'{"prompts": ["a", 1]}', r'"prompts"\[1\] must be a string, got int'),
    (b'{"prompts": [null]}', r'"prompts"\[0\] must be a string, got NoneType'),
    (b'{"prompts": ["a", "b", "c"]}', "3 entries, more than the limit 2"),
    (b'{"prompts": ["' + b"x" * 11 + b'"]}', "11 characters, more than the limit 10"),
    (b'{"prompts": ["\\ud800"]}', "lone surrogate"),
])
def test_malformed_prompt_bodies(body, message):
    with pytest.raises(wire.WireError, match=message):
        wire.decode_prompts(body, max_prompts=2, max_prompt_chars=10)


def unpadded(payload: bytes, extra: int) -> bytes:
    """The same tensors with the header padded by `extra` spaces instead of to 8 bytes:
    valid safetensors (the format does not require padding), data at an unaligned offset."""
    (n,) = struct.unpack_from("<Q", payload)
    raw = payload[8:8 + n].rstrip(b" ") + b" " * extra
    return struct.pack("<Q", len(raw)) + raw + payload[8 + n:]


@pytest.mark.parametrize("extra", range(8))
def test_unpadded_headers_decode_to_aligned_arrays(extra):
    rng = np.random.default_rng(extra)
    tensors = {"a": rng.standard_normal((2, 3)).astype(np.float32), "b": np.arange(5, dtype=np.int64),
               "c": rng.standard_normal(3).astype(np.float64), "d": np.array([1, 0, 1], np.uint8)}
    payload = unpadded(wire.encode(tensors), extra)
    specs = [wire.TensorSpec("a", ("x", "y"), ("F32",)), wire.TensorSpec("b", ("x",), ("I64",)),
             wire.TensorSpec("c", ("x",), ("F64",)), wire.TensorSpec("d", ("x",), ("U8",))]
    for data in (payload, bytearray(payload)):
        out = wire.decode(data, specs)
        for name, arr in tensors.items():
            assert out[name].flags.aligned and out[name].flags.c_contiguous, (extra, name)
            assert same_bits(out[name], arr), (extra, name)
