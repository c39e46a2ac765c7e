"""FlowMatchDiscreteScheduler against the reference's fixtures (golden/scheduler)."""
import json
import shutil

import mindspore as ms
import numpy as np
import pytest

from stepvideo.diffusion.scheduler import FlowMatchDiscreteScheduler, FlowMatchDiscreteSchedulerOutput
from support import assert_parity, cases, golden, load

CASES = cases("scheduler")["cases"]
INPUTS = load("scheduler", "inputs")
OUTPUTS = load("scheduler", "outputs")


def _assert_bit_exact(port, ref, what):
    """Schedules are computed in numpy float32 with the reference's rounding: equal bit for bit."""
    port = port.asnumpy() if isinstance(port, ms.Tensor) else port
    assert port.dtype == np.float32 and port.shape == ref.shape, f"{what}: {port.dtype}{port.shape}"
    assert np.array_equal(port.view(np.uint32), ref.view(np.uint32)), (
        f"{what}: {int((port != ref).sum())} elements differ, max {np.abs(port - ref).max():.3e}")
    assert_parity(port, ref, what)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_schedule_and_euler_loop(case):
    name = case["name"]
    scheduler = FlowMatchDiscreteScheduler(num_train_timesteps=case["num_train_timesteps"],
                                           reverse=case["reverse"], solver=case["solver"])
    _assert_bit_exact(scheduler.sigmas, OUTPUTS[f"{name}.init_sigmas"], f"{name}.init_sigmas")
    _assert_bit_exact(scheduler.timesteps, OUTPUTS[f"{name}.init_timesteps"], f"{name}.init_timesteps")

    scheduler.set_timesteps(case["num_inference_steps"], case["time_shift"])
    _assert_bit_exact(scheduler.sigmas, OUTPUTS[f"{name}.sigmas"], f"{name}.sigmas")
    _assert_bit_exact(scheduler.timesteps, OUTPUTS[f"{name}.timesteps"], f"{name}.timesteps")

    sample = ms.Tensor(INPUTS[f"{name}.sample"])
    for i, t in enumerate(scheduler.timesteps):  # the pipeline's loop
        sample = scheduler.step(model_output=ms.Tensor(INPUTS[f"{name}.model_output.{i}"]), timestep=t,
                                sample=sample)
        assert isinstance(sample, ms.Tensor) and sample.dtype == ms.float32
        assert_parity(sample, OUTPUTS[f"{name}.prev_sample.{i}"], f"{name}.prev_sample.{i}")
    assert scheduler.step_index == case["num_inference_steps"]


@pytest.mark.parametrize("case", [CASES[2], CASES[4]], ids=["c2", "c4"])
def test_numpy_in_numpy_out(case):
    name = case["name"]
    scheduler = FlowMatchDiscreteScheduler(reverse=case["reverse"])
    scheduler.set_timesteps(case["num_inference_steps"], case["time_shift"])
    sample = INPUTS[f"{name}.sample"]
    for i, t in enumerate(scheduler.timesteps.asnumpy()):
        sample = scheduler.step(INPUTS[f"{name}.model_output.{i}"], t, sample)
        assert isinstance(sample, np.ndarray) and sample.dtype == np.float32
        assert_parity(sample, OUTPUTS[f"{name}.prev_sample.{i}"], f"numpy {name}.prev_sample.{i}")


def test_from_pretrained_reads_scheduler_config(tmp_path):
    """The fixture's config.json is a diffusers scheduler_config.json (reverse: true, device: null)."""
    folder = tmp_path / "scheduler"
    folder.mkdir()
    shutil.copy(golden("scheduler") / "config.json", folder / "scheduler_config.json")
    scheduler = FlowMatchDiscreteScheduler.from_pretrained(str(folder))
    assert scheduler.config.reverse is True and scheduler.config.solver == "euler"
    assert scheduler.config.num_train_timesteps == 1000
    from_dict = FlowMatchDiscreteScheduler.from_config(json.loads((folder / "scheduler_config.json").read_text()))
    assert from_dict.config.reverse is True

    case = CASES[2]  # reverse=True like the file
    scheduler.set_timesteps(case["num_inference_steps"], case["time_shift"])
    _assert_bit_exact(scheduler.timesteps, OUTPUTS["c2.timesteps"], "from_pretrained c2.timesteps")

    scheduler.save_pretrained(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "scheduler_config.json").read_text())
    original = json.loads((folder / "scheduler_config.json").read_text())
    for key in ("_class_name", "num_train_timesteps", "reverse", "solver", "device"):
        assert saved[key] == original[key], key


def test_defaults_match_the_published_checkpoint():
    scheduler = FlowMatchDiscreteScheduler()
    assert scheduler.config.reverse is False and len(scheduler) == 1000
    _assert_bit_exact(scheduler.sigmas, OUTPUTS["c4.init_sigmas"], "default init_sigmas (reverse=False)")


def test_return_dict_and_begin_index():
    case = CASES[3]
    scheduler = FlowMatchDiscreteScheduler(reverse=case["reverse"])
    scheduler.set_timesteps(case["num_inference_steps"], case["time_shift"])
    scheduler.set_begin_index(0)
    out = scheduler.step(ms.Tensor(INPUTS["c3.model_output.0"]), scheduler.timesteps[0],
                         ms.Tensor(INPUTS["c3.sample"]), return_dict=True)
    assert isinstance(out, FlowMatchDiscreteSchedulerOutput)
    assert_parity(out.prev_sample, OUTPUTS["c3.prev_sample.0"], "return_dict c3.prev_sample.0")


def test_unsupported_solver():
    with pytest.raises(ValueError, match="heun"):
        FlowMatchDiscreteScheduler(solver="heun")


def test_integer_timestep_and_unknown_timestep_are_rejected():
    scheduler = FlowMatchDiscreteScheduler()
    scheduler.set_timesteps(4, 13.0)
    sample = np.zeros((1, 2), np.float32)
    with pytest.raises(ValueError, match="integer"):
        scheduler.step(sample, 0, sample)
    with pytest.raises(ValueError, match="integer"):
        scheduler.step(sample, ms.Tensor(1, ms.int64), sample)
    with pytest.raises(ValueError, match="not one of"):
        scheduler.step(sample, 0.123, sample)
