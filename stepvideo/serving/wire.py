"""What travels between the DiT job and the caption / VAE services.

Tensors travel as one safetensors payload (an 8-byte little-endian header
length, a JSON header, then the raw little-endian tensor bytes), prompts as a
JSON object. Nothing is ever unpickled (a pickle from the network could run code).

Array representation (both directions, and in `stepvideo.diffusion.interfaces`):
numpy arrays; floating tensors are float32 in memory. A float32 array whose
values are all bfloat16 values (what a bf16 model produces, widened exactly)
travels as BF16 bits, which halves the bytes and loses nothing; every other
array travels in its own dtype. Decoding widens BF16 to float32 exactly, so
`decode(encode(t))` reproduces every array bit for bit. A numpy array of
MindSpore's own ``bfloat16`` dtype (`Tensor.asnumpy()` of a bf16 tensor) is
accepted too and sent as its raw bits.

A decoder is given the tensors it expects (`TensorSpec`): names, dtypes, rank,
fixed sizes and per-dimension and total-element limits are checked on the
header alone, before any tensor data is touched, and every error says what was
expected.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from stepvideo import dtypes
from stepvideo.utils import safetensors_io as st

BF16 = st.BF16
MEDIA_TYPE = "application/octet-stream"
JSON_MEDIA_TYPE = "application/json"

# The HTTP protocol both sides share.
CAPTION_PATH = "/caption-api"
VAE_PATH = "/vae-api"
VAE_ENCODE_PATH = "/vae-encode-api"  # TI2V's first image (the original's name)
HEALTH_PATH = "/health"
DEFAULT_PORTS = {"caption": 5000, "vae": 5001}
TOKEN_ENV = "STEPVIDEO_API_TOKEN"  # the shared secret, sent as "Authorization: Bearer <token>"


def check_token(token: str) -> str:
    """A token must be printable ASCII without spaces: it travels in an HTTP header."""
    if not isinstance(token, str) or not token or not all(33 <= ord(c) <= 126 for c in token):
        what = f"a string of {len(token)} characters" if isinstance(token, str) else type(token).__name__
        raise ValueError("the service token must be a non-empty string of printable ASCII characters without "
                         f"spaces (it is sent in an HTTP header); got {what} that is not")
    return token


# The element types the services exchange (a subset of what the format allows).
_SENT = {dtypes.BY_NAME[n] for n in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "uint8", "bool")}

# Largest JSON header accepted from a peer: a few tensors need a few hundred bytes.
MAX_HEADER_BYTES = 64 * 1024
# Sent in pieces so the event loop interleaves other work (e.g. /health) with a large response.
_CHUNK_BYTES = 4 * 1024 * 1024


class WireError(ValueError):
    """A payload is malformed or not what the receiver expected (the message says what was)."""


# --------------------------------------------------------------------------- encoding


def _is_bf16_exact(x: np.ndarray) -> bool:
    """True if every float32 value of `x` is a bfloat16 value (low 16 bits zero)."""
    bits = x.reshape(-1).view(np.uint32)
    head = bits[:4096]  # model outputs in fp32 fail on the first few values: skip the full pass
    return not (head & 0xFFFF).any() and not (bits & 0xFFFF).any()


def _wire_form(name: str, arr) -> Tuple[np.ndarray, str]:
    """(contiguous little-endian array, safetensors dtype) for one tensor."""
    if not isinstance(arr, np.ndarray):
        raise WireError(f"tensor {name!r}: expected a numpy array, got {type(arr).__name__}")
    arr = st.contiguous(arr)
    row = dtypes.of_array(arr)
    if row is dtypes.BF16:  # MindSpore's numpy bf16 (Tensor.asnumpy() of a bf16 tensor): its bits
        return arr.view(np.uint16), BF16
    if row not in _SENT:
        raise WireError(f"tensor {name!r}: dtype {arr.dtype} cannot be sent; "
                        f"expected one of float32/float16/float64/int64/int32/uint8/bool or bfloat16")
    arr = arr.astype(row.numpy, copy=False)  # little-endian
    if row.name == "float32" and arr.size and _is_bf16_exact(arr):
        # The high halves of the float32 words are the bf16 bits (little-endian: odd uint16s).
        return arr.reshape(-1).view(np.uint16)[1::2].copy().reshape(arr.shape), BF16
    return arr, row.safetensors


def encode_parts(tensors: Mapping[str, np.ndarray]) -> Tuple[int, List[memoryview]]:
    """(total bytes, buffers) of the safetensors payload, without copying tensor data.

    The layout is `safetensors_io.encode_parts`' (names sorted, compact JSON header padded
    with spaces to 8 bytes), which `safetensors_io.to_bytes` writes too.
    """
    return st.encode_parts({name: _wire_form(name, arr) for name, arr in tensors.items()})


def encode(tensors: Mapping[str, np.ndarray]) -> bytes:
    """The safetensors payload of `tensors` as one bytes object (see the module docstring)."""
    return b"".join(encode_parts(tensors)[1])


def iter_chunks(parts: Sequence[memoryview], chunk_bytes: int = _CHUNK_BYTES) -> Iterator[bytes]:
    """The payload in pieces of at most `chunk_bytes` (for streaming a large response)."""
    for part in parts:
        for start in range(0, len(part), chunk_bytes):
            yield bytes(part[start:start + chunk_bytes])


# --------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class TensorSpec:
    """What one expected tensor must look like.

    axes: a name per axis, used in messages, e.g. ("b", "T", "c", "h", "w");
    dtypes: accepted safetensors dtypes; sizes: a required size per axis (None: any);
    max_sizes: an upper bound per axis (None: none); min_size: lower bound for every
    axis (1: no empty tensors).
    """

    name: str
    axes: Tuple[str, ...]
    dtypes: Tuple[str, ...]
    sizes: Tuple[Optional[int], ...] = ()
    max_sizes: Tuple[Optional[int], ...] = ()
    min_size: int = 1

    def describe(self) -> str:
        dims = []
        for i, axis in enumerate(self.axes):
            fixed = self.sizes[i] if i < len(self.sizes) else None
            top = self.max_sizes[i] if i < len(self.max_sizes) else None
            dims.append(str(fixed) if fixed is not None else (f"{axis}<={top}" if top is not None else axis))
        return f"{self.name!r} of shape ({', '.join(dims)}) and dtype {'/'.join(self.dtypes)}"

    def check(self, dtype, shape) -> None:
        """Raise WireError unless (dtype, shape) from a header fits this spec."""
        want = self.describe()
        if dtype not in self.dtypes:
            raise WireError(f"tensor {self.name!r}: dtype {dtype!r}, expected {'/'.join(self.dtypes)} ({want})")
        if not isinstance(shape, list) or not all(type(d) is int for d in shape):
            raise WireError(f"tensor {self.name!r}: shape {shape!r} is not a list of integers (expected {want})")
        if len(shape) != len(self.axes):
            raise WireError(f"tensor {self.name!r}: rank {len(shape)} (shape {shape}), "
                            f"expected rank {len(self.axes)}: {want}")
        for i, (axis, size) in enumerate(zip(self.axes, shape)):
            fixed = self.sizes[i] if i < len(self.sizes) else None
            top = self.max_sizes[i] if i < len(self.max_sizes) else None
            if fixed is not None and size != fixed:
                raise WireError(f"tensor {self.name!r}: axis {axis} has size {size}, expected {fixed} ({want})")
            if size < self.min_size:
                raise WireError(f"tensor {self.name!r}: axis {axis} has size {size}, "
                                f"expected at least {self.min_size} ({want})")
            if top is not None and size > top:
                raise WireError(f"tensor {self.name!r}: axis {axis} has size {size}, "
                                f"larger than the limit {top} ({want})")


def _header(data, source: str) -> Tuple[dict, int]:
    """(JSON header without its metadata, byte where tensor data starts), checked for form only
    (no numpy arithmetic on peer numbers)."""
    if len(data) < 8:
        raise WireError(f"{source}: {len(data)} bytes; a safetensors payload starts with an 8-byte header length")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > MAX_HEADER_BYTES:
        raise WireError(f"{source}: header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes "
                        "(not a safetensors payload?)")
    if 8 + n > len(data):
        raise WireError(f"{source}: header length {n} does not fit in {len(data)} bytes (truncated?)")
    try:
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WireError(f"{source}: the safetensors header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise WireError(f"{source}: the safetensors header must be a JSON object, got {type(header).__name__}")
    header.pop("__metadata__", None)
    for name, meta in header.items():
        if not isinstance(meta, dict):
            raise WireError(f"{source}: header entry {name!r} must be an object with dtype/shape/data_offsets")
    return header, 8 + n


def decode(data, specs: Sequence[TensorSpec], *, max_elements: Optional[int] = None,
           source: str = "payload") -> Dict[str, np.ndarray]:
    """Check `data` against `specs` and return name -> array (BF16 widened to float32).

    Exactly the names of `specs` must be present. `max_elements` bounds the sum
    of all tensors' element counts. Arrays are views of `data` when it is a
    writable buffer (a bytearray) and the data is aligned for its dtype, copies otherwise.
    The header is parsed once.
    """
    header, data_start = _header(data, source)
    expected = {s.name: s for s in specs}
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise WireError(f"{source}: expected tensors {sorted(expected)}, got {sorted(header)}"
                        + (f"; missing {missing}" if missing else "")
                        + (f"; unexpected {unexpected}" if unexpected else ""))
    total = 0
    for name, spec in expected.items():
        spec.check(header[name].get("dtype"), header[name].get("shape"))
        count = 1
        for d in header[name]["shape"]:
            count *= d
        total += count
    if max_elements is not None and total > max_elements:
        raise WireError(f"{source}: {total} elements in all, larger than the limit {max_elements}")
    # Shapes are now bounded: the format's own checks of offsets and sizes are safe to run.
    try:
        infos = st.check_header(header, data_start, len(data), source)
    except st.SafetensorsError as e:
        raise WireError(str(e)) from None
    _check_contiguous(infos, data_start, len(data), source)
    writable = isinstance(data, bytearray)
    out = {}
    for name, info in infos.items():
        count = int(np.prod(info.shape, dtype=np.int64))
        stored = dtypes.BY_SAFETENSORS[info.dtype].numpy
        arr = np.frombuffer(data, dtype=stored, count=count, offset=info.start).reshape(info.shape)
        if info.dtype == BF16:
            arr = dtypes.bf16_bits_to_f32(arr)
        elif not writable or not arr.flags.aligned:
            # The format allows any header length, so data may start at an offset that is not a
            # multiple of the item size; MindSpore (and some numpy paths) need aligned memory.
            arr = arr.copy()
        out[name] = arr
    return out


def _check_contiguous(infos: Mapping[str, "st.TensorInfo"], data_start: int, total: int, source: str) -> None:
    """Tensor data must tile the data section exactly: no gaps, overlaps or trailing bytes."""
    position = data_start
    for start, end, name in sorted((i.start, i.end, i.name) for i in infos.values()):
        if start != position:
            raise WireError(f"{source}: tensor {name!r} data starts at byte {start}, expected {position} "
                            "(overlapping or non-contiguous tensor data)")
        position = end
    if position != total:
        raise WireError(f"{source}: {total - position} bytes after the last tensor (expected none)")


# --------------------------------------------------------------------------- prompts


def encode_prompts(prompts: Sequence[str]) -> bytes:
    """The caption request body: {"prompts": [...]} as UTF-8 JSON."""
    return json.dumps({"prompts": list(prompts)}, ensure_ascii=False).encode("utf-8")


def decode_prompts(body, *, max_prompts: int, max_prompt_chars: int) -> List[str]:
    """Check a caption request body and return its prompts.

    Expected: a UTF-8 JSON object with exactly one key "prompts" holding 1 to
    `max_prompts` strings of at most `max_prompt_chars` characters each (the
    empty string is allowed: the default negative prompt is empty).
    """
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        raise WireError(f"the request body is not valid UTF-8 (byte {e.start}: {e.reason})") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise WireError(f"the request body is not valid JSON ({str(e)[:200]}); "
                        'expected {"prompts": ["...", ...]}') from None
    if not isinstance(obj, dict) or set(obj) != {"prompts"}:
        got = f"an object with keys {sorted(obj)[:10]}" if isinstance(obj, dict) else type(obj).__name__
        raise WireError(f'expected a JSON object with exactly the key "prompts", got {got}')
    prompts = obj["prompts"]
    if not isinstance(prompts, list) or not prompts:
        raise WireError(f'"prompts" must be a non-empty list of strings, got {type(prompts).__name__}'
                        + (" (empty)" if isinstance(prompts, list) else ""))
    if len(prompts) > max_prompts:
        raise WireError(f'"prompts" has {len(prompts)} entries, more than the limit {max_prompts}')
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise WireError(f'"prompts"[{i}] must be a string, got {type(p).__name__}')
        if len(p) > max_prompt_chars:
            raise WireError(f'"prompts"[{i}] has {len(p)} characters, more than the limit {max_prompt_chars}')
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate written as a \\ud800 escape
            raise WireError(f'"prompts"[{i}] is not valid Unicode text (lone surrogate)') from None
    return prompts
