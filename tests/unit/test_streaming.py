"""Block streaming (--offload blocks) in one process: same numbers as the resident model, clear refusals.

A 3-block DiT (2 heads x 128) is written as small bf16 and fp32 shards (1 MiB, so blocks span
shards); 3 blocks is odd, so the wrap-around from the last block to the first lands in the
same slot and takes the unprefetched path too. Each streamed model runs twice (the second
call starts from the slots the first one left) and must equal the resident model bit for bit,
eager (bf16 and fp32 files) and compiled (bf16 files). Streamed blocks run through the cell of
the first block of their slot (`BlockStreamer.block`), so the compiled streamed model compiles 2 blocks. Step-LLM's streamed layers and the runner's flag are checked the same way.

The Ascend fill (`DeviceSlots`: slots as MindSpore tensors, `Tensor.copy_(non_blocking=True)` on a
separate stream, ordered by events) runs here through a stand-in of `mindspore.runtime`'s stream
API (on CPU, MindSpore 2.7's `runtime.Stream` exists but `StreamCtx` fails and `current_stream()`
is None): the copies and the DiT are MindSpore's own CPU kernels, the stand-in logs the stream
and event calls so the test checks their order.
"""
from __future__ import annotations

import contextlib
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from stepvideo import backend
from stepvideo.checkpoint import CheckpointError, save_sharded
from stepvideo.modules.model import StepVideoModel
from stepvideo.streaming import DeviceSlots, dit_streaming, load_streaming
from stepvideo.text_encoder.stepllm import Step1Model
from stepvideo.utils import safetensors_io as st

DIT = dict(num_attention_heads=2, attention_head_dim=128, in_channels=8, out_channels=8, num_layers=3,
           caption_channels=[64, 32])
LLM = dict(hidden_size=256, num_layers=3, num_attention_heads=4, num_attention_groups=2, ffn_hidden_size=320,
           layernorm_epsilon=1e-5, padded_vocab_size=128)


def random_weights(net, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in net.parameters_and_names():
        a = 0.05 * rng.standard_normal(p.shape, dtype=np.float32)
        out[name] = a + 1 if "norm" in name and name.endswith("weight") else a
    return out


def write(folder: Path, net, config: dict, prefix: str, bf16: bool) -> Path:
    save_sharded(random_weights(net, 0), folder, prefix, max_shard_bytes=2**20, bf16=bf16)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def dit_folders(tmp_path_factory) -> dict:
    """{"bf16": folder, "fp32": folder}: the same weights in both file dtypes."""
    return {dtype: write(tmp_path_factory.mktemp(f"dit_{dtype}") / "transformer", StepVideoModel(**DIT), DIT,
                         "diffusion_pytorch_model", dtype == "bf16") for dtype in ("bf16", "fp32")}


def dit_inputs() -> dict:
    rng = np.random.default_rng(1)
    return dict(hidden_states=Tensor(rng.standard_normal((2, 2, 8, 4, 4), dtype=np.float32)),
                timestep=Tensor(np.array([900.0, 100.0], np.float32)),
                encoder_hidden_states=Tensor(rng.standard_normal((2, 6, 64), dtype=np.float32)),
                encoder_attention_mask=Tensor(np.array([[1] * 10, [1] * 7 + [0] * 3], np.float32)),
                encoder_hidden_states_2=Tensor(rng.standard_normal((2, 4, 32), dtype=np.float32)),
                return_dict=False)


def header_bytes(folder: Path, keep) -> int:
    """fp32 bytes of the checkpoint tensors whose key `keep` accepts, from the files' own headers."""
    total = 0
    for shard in folder.glob("*.safetensors"):
        with st.SafetensorsFile(shard) as f:
            total += sum(int(np.prod(i.shape)) * 4 for k, i in f.tensors.items() if keep(k))
    return total


def resident_and_streamed(dit_folder, jit):
    """(inputs, the resident model's output, a model streaming blocks 0-2 from `dit_folder`, its load report,
    its streamer), both models eager or both compiled."""
    inputs = dit_inputs()
    expected = StepVideoModel.from_pretrained(dit_folder).set_jit(jit)(**inputs).asnumpy()
    model = StepVideoModel.from_config_dict(DIT)
    report, streamer = dit_streaming(model, dit_folder, range(3))
    model.set_train(False)
    model.set_jit(jit)
    return inputs, expected, model, report, streamer


@pytest.mark.parametrize("dtype, jit", [("bf16", False), ("fp32", False), ("bf16", True)],
                         ids=["bf16-eager", "fp32-eager", "bf16-compiled"])
def test_streamed_dit_equals_resident_bitwise(dit_folders, dtype, jit, in_tmp):
    dit_folder = dit_folders[dtype]
    inputs, expected, model, report, streamer = resident_and_streamed(dit_folder, jit)
    try:
        for call in range(2):
            out = model(**inputs).asnumpy()
            assert np.array_equal(out, expected), f"call {call}: max diff {np.abs(out - expected).max()}"
        # Only the non-block weights were loaded; the blocks came through the slots. Call 1 fills
        # 0, 1, 2; call 2 fills 0 (slot 0 held 2) and 2 (slot 0 held 0); block 1 is still in slot 1.
        assert report.bytes == header_bytes(dit_folder, lambda k: not k.startswith("transformer_blocks."))
        assert streamer.stats.fills == 3 + 2
        one_block = header_bytes(dit_folder, lambda k: k.startswith("transformer_blocks.0."))
        assert streamer.stats.bytes_read == 5 * one_block // (2 if dtype == "bf16" else 1)
    finally:
        streamer.close()


class StandinEvent:
    """`mindspore.runtime.Event` as `DeviceSlots` uses it: returned by `Stream.record_event()`, `synchronize()`."""

    def __init__(self, log: list, stream: "StandinStream"):
        self.id, self.stream, self.log = len(log), stream, log  # unique: each event's record adds a log entry

    def synchronize(self) -> None:
        self.log.append(("synchronize", self.stream.name, self.id))


class StandinStream:
    """`mindspore.runtime.Stream`: `record_event()`, `wait_event(event)`, `synchronize()`; calls are logged.

    CPU kernels run synchronously, so work issued on either stream is complete when its call
    returns; what the stand-in checks is the order of the calls."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def record_event(self, event=None) -> StandinEvent:
        event = StandinEvent(self.log, self)
        self.log.append(("record", self.name, event.id))
        return event

    def wait_event(self, event: StandinEvent) -> None:
        assert isinstance(event, StandinEvent), f"wait_event takes an Event, got {type(event).__name__}"
        self.log.append(("wait", self.name, event.id, event.stream.name))

    def synchronize(self) -> None:
        self.log.append(("synchronize", self.name, None))


@pytest.fixture
def standin_streams(monkeypatch):
    """The log of stream calls: `backend.weight_copy_stream()` gives a copy stream; `ms.runtime.StreamCtx` and
    `ms.runtime.current_stream()` switch between it and a compute stream."""
    log: list = []
    compute, copy = StandinStream("compute", log), StandinStream("copy", log)
    current = [compute]

    @contextlib.contextmanager
    def stream_ctx(stream):
        current.append(stream)
        log.append(("enter", stream.name))
        try:
            yield
        finally:
            current.pop()
            log.append(("exit", stream.name))

    monkeypatch.setattr(ms.runtime, "StreamCtx", stream_ctx)
    monkeypatch.setattr(ms.runtime, "current_stream", lambda: current[-1])
    monkeypatch.setattr(backend, "weight_copy_stream", lambda: copy)
    return log


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "compiled"])
def test_device_slots_through_a_stream_standin_equal_resident_bitwise(dit_folders, standin_streams, jit):
    """The Ascend path (DeviceSlots) on CPU kernels: same bits as the resident model, fills ordered by events.

    fp32 files: the device path copies the stored bytes as they are, and CPU parameters are fp32."""
    dit_folder = dit_folders["fp32"]
    log = standin_streams
    inputs, expected, model, _, streamer = resident_and_streamed(dit_folder, jit)
    assert isinstance(streamer.slots, DeviceSlots)
    released = []
    release = streamer.mapped.release
    streamer.mapped.release = lambda key: (log.append(("release", key)), release(key))
    entered = streamer.block

    @contextlib.contextmanager
    def logged_block(index):
        with entered(index) as cell:
            log.append(("run", index))
            yield cell

    model.block_hook = logged_block
    try:
        for call in range(2):
            out = model(**inputs).asnumpy()
            assert np.array_equal(out, expected), f"call {call}: max diff {np.abs(out - expected).max()}"
    finally:
        streamer.close()
    records = {entry[2]: entry[1] for entry in log if entry[0] == "record"}
    waits = [entry for entry in log if entry[0] == "wait"]
    # Fills of call 1: 0, 1, 2; call 2: 0, 2 (as in the host test). The compute stream waits once for
    # each fill, on an event of the copy stream; the copy stream waits, before every fill but the first
    # of each slot, for an event the compute stream recorded when a block left that slot.
    assert streamer.stats.fills == 5
    assert [(w[1], records[w[2]]) for w in waits].count(("compute", "copy")) == 5, waits
    assert [(w[1], records[w[2]]) for w in waits].count(("copy", "compute")) == 5 - 2, waits
    assert all(w[3] == records[w[2]] for w in waits)
    # The copy stream's work (its waits and the copies) is issued inside StreamCtx(copy stream).
    depth = 0
    for entry in log:
        depth += {"enter": 1, "exit": -1}.get(entry[0], 0)
        if entry[0] == "wait" and entry[1] == "copy":
            assert depth == 1, log
    # Each block runs after the compute stream's last wait for a copy event, issued after its fill.
    for i, entry in enumerate(log):
        if entry[0] == "run":
            before = [e for e in log[:i] if e[0] == "wait" and e[1] == "compute"]
            assert before, f"block {entry[1]} ran before any wait for a copy: {log[:i]}"
    # Mapped pages are released only once the copies reading them are known complete.
    for i, entry in enumerate(log):
        if entry[0] == "release":
            last = next(e for e in reversed(log[:i]) if e[0] != "release")
            assert last[0] == "synchronize", f"{entry[1]} released after {last}, expected an event synchronize"
            released.append(entry[1])
    assert len(released) == 5 * len(streamer.keys[0]), len(released)


def test_blocks_outside_the_streamed_range_are_refused(dit_folders):
    dit_folder = dit_folders["bf16"]
    model = StepVideoModel.from_config_dict(DIT)
    _, streamer = dit_streaming(model, dit_folder, range(1, 3))
    try:
        with pytest.raises(KeyError, match=r"block 0 is not streamed here \(streamed: \[1, 2\]\)"):
            with streamer.block(0):
                pass
    finally:
        streamer.close()


def test_streamed_step_llm_equals_resident_bitwise(tmp_path):
    folder = write(tmp_path / "step_llm", Step1Model(**LLM), LLM, "model", bf16=True)
    ids = Tensor(np.random.default_rng(2).integers(0, 128, (2, 12)).astype(np.int64))
    expected = Step1Model.from_pretrained(folder)(ids).asnumpy()
    model = Step1Model.from_pretrained_streaming(folder)
    try:
        for _ in range(2):
            assert np.array_equal(model(ids).asnumpy(), expected)
        assert model.streamer.stats.fills == 3 + 2  # as for the DiT: layer 1 stays in its slot
    finally:
        model.streamer.close()


def test_run_parallel_offload_gives_the_same_latents(tiny_model_dir, in_tmp):
    """run_parallel.py --offload blocks in one process (DiT blocks and, with --local_models, Step-LLM's layers)."""
    from stepvideo.job import main

    latents = {}
    for offload in ("none", "blocks"):
        path = in_tmp / f"latents_{offload}.safetensors"
        code = main(["--model_dir", str(tiny_model_dir), "--local_models", "--prompt", "a cat", "--infer_steps", "2",
                     "--num_frames", "1", "--height", "32", "--width", "80", "--output_type", "latent",
                     "--latents_out", str(path), "--ulysses_degree", "1", "--offload", offload, "--device", "cpu",
                     "--eager"])  # compiled streaming: test_streamed_dit_equals_resident_bitwise
        assert code == 0
        latents[offload] = st.load_file(path)["latents"]
    assert np.array_equal(latents["blocks"], latents["none"])


# ------------------------------------------------------------------------------------- refusals


def test_a_format_that_cannot_be_mapped_is_refused(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(DIT))
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"PK\x03\x04 a torch zip archive")
    with pytest.raises(CheckpointError, match=r"\['diffusion_pytorch_model.bin'\] cannot be memory-mapped for "
                                              r"streaming \(--offload\); streaming needs safetensors"):
        dit_streaming(StepVideoModel.from_config_dict(DIT), folder, range(3))


HUGE = dict(DIT, num_attention_heads=160, num_layers=2)  # D = 20480: one block is 6.7e9 parameters


def sparse_checkpoint(folder: Path, config: dict) -> dict:
    """A bf16 checkpoint of `config`'s shapes whose data section is a hole: its header is real, it takes no disk.

    Returns {key: shape}.
    """
    from stepvideo.checkpoint import named_parameters

    shapes = {k: tuple(p.shape) for k, p in named_parameters(StepVideoModel.from_config_dict(config)).items()}
    header, offset = {}, 0
    for key in sorted(shapes):
        size = int(np.prod(shapes[key])) * 2
        header[key] = {"dtype": "BF16", "shape": list(shapes[key]), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir(parents=True)
    with open(folder / "diffusion_pytorch_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    (folder / "config.json").write_text(json.dumps(config))
    return shapes


def gib_numbers(message: str):
    m = re.search(r"needs ([\d.]+) GiB of host memory, but only ([\d.]+) GiB is available", message)
    assert m, message
    return float(m.group(1)), float(m.group(2))


def test_not_enough_host_memory_is_refused_before_loading(tmp_path):
    import psutil

    folder = tmp_path / "transformer"
    shapes = sparse_checkpoint(folder, HUGE)
    block = sum(int(np.prod(s)) * 4 for k, s in shapes.items() if k.startswith("transformer_blocks.0."))
    others = sum(int(np.prod(s)) * 4 for k, s in shapes.items() if not k.startswith("transformer_blocks."))

    with pytest.raises(CheckpointError) as streamed:
        model = StepVideoModel.from_config_dict(HUGE)
        load_streaming(model, folder, {i: f"transformer_blocks.{i}." for i in range(2)},
                       {i: model.transformer_blocks[i] for i in range(2)})
    needed, available = gib_numbers(str(streamed.value))
    assert "resident weights" in str(streamed.value) and "2 block slots" in str(streamed.value)
    assert abs(needed - (others + 2 * block) / 2**30) < 0.01
    assert available < needed and abs(available - psutil.virtual_memory().available / 2**30) < 2

    with pytest.raises(CheckpointError) as resident:
        StepVideoModel.from_pretrained(folder)
    needed, _ = gib_numbers(str(resident.value))
    assert abs(needed - (others + 2 * block) / 2**30) < 0.01  # 2 blocks: the whole model here
    assert str(folder) in str(resident.value)
