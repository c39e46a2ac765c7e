"""Flow-matching Euler scheduler (`FlowMatchDiscreteScheduler`) of Step-Video-T2V.

The noise level sigma runs over `linspace(1, 0, N+1)` bent by the SD3 time shift
`s*u / (1 + (s-1)*u)`. With `reverse=False` (the published checkpoint) sigma
becomes `1 - sigma`, so t runs from 0 (noise) to 1 (data). The timesteps handed
to the DiT are `sigmas[:-1]`, in [0, 1]; the DiT multiplies them by 1000 itself.
A step is one Euler update `x + v * (sigma[k+1] - sigma[k])` in float32.

The schedule is computed in numpy float32 with the reference's rounding, so
sigmas and timesteps are bit-identical to torch's (see `_linspace_f32`).
Configured from `scheduler/scheduler_config.json` through mindone's diffusers `ConfigMixin`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor
from mindone.diffusers.configuration_utils import ConfigMixin, register_to_config
from mindone.diffusers.schedulers.scheduling_utils import SchedulerMixin
from mindone.diffusers.utils import BaseOutput

Array = Union[Tensor, np.ndarray]


@dataclass
class FlowMatchDiscreteSchedulerOutput(BaseOutput):
    """`prev_sample`: the sample after the step, float32, same shape as the input sample."""

    prev_sample: Array


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps)` in float32, bit for bit as torch computes it on CPU.

    torch rounds the step to float32, then forms each element with a single
    rounding: `start + step*i` for the first half, `end - step*(steps-1-i)` for
    the second. In float64 these products and sums are exact (24-bit step times
    an index below 2**24, added to 0 or 1), so one cast to float32 reproduces it;
    np.linspace in float64 then cast differs in the last bit for some elements.
    """
    step = np.float64(np.float32(np.float32(end) - np.float32(start)) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    values = np.where(i < steps // 2, start + step * i, end - step * (steps - 1 - i))
    return values.astype(np.float32)


class FlowMatchDiscreteScheduler(SchedulerMixin, ConfigMixin):
    """Euler sampler for rectified-flow models.

    Args:
        num_train_timesteps: length of the training schedule (timesteps before `set_timesteps`
            are `sigmas[:-1] * num_train_timesteps`).
        reverse: if False, sigma (and t) run from 0 (noise) to 1 (data) -- the published checkpoint.
        solver: only "euler".
        device: a field of the original's scheduler_config.json (a torch device); kept so that
            file loads and saves unchanged. Placement is MindSpore's context, so it is not used.
    """

    _compatibles = []
    order = 1
    supported_solvers = ("euler",)

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, reverse: bool = False, solver: str = "euler",
                 device: Optional[str] = None):
        if solver not in self.supported_solvers:
            raise ValueError(f"Solver {solver!r} not supported. Supported solvers: {list(self.supported_solvers)}")
        sigmas = _linspace_f32(1.0, 0.0, num_train_timesteps + 1)
        if not reverse:
            sigmas = sigmas[::-1].copy()
        self._sigmas = sigmas
        self._timesteps = sigmas[:-1] * np.float32(num_train_timesteps)
        self.num_inference_steps: Optional[int] = None
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None

    @property
    def sigmas(self) -> Tensor:
        """(N+1,) float32 noise levels."""
        return Tensor(self._sigmas, ms.float32)

    @property
    def timesteps(self) -> Tensor:
        """(N,) float32 values fed to the model, one per step."""
        return Tensor(self._timesteps, ms.float32)

    @property
    def step_index(self) -> Optional[int]:
        """Index of the current sigma; advanced by one per `step`."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """First step index if set with `set_begin_index`; else found from the first timestep."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def sd3_time_shift(self, t: np.ndarray, time_shift: float = 13.0) -> np.ndarray:
        """SD3 shift of a float32 schedule, each operation rounded to float32 as in the reference."""
        shift = np.float32(time_shift)
        return (shift * t) / (np.float32(1.0) + np.float32(time_shift - 1) * t)

    def set_timesteps(self, num_inference_steps: int, time_shift: float = 13.0) -> None:
        """Schedule `num_inference_steps` Euler steps with the given time shift; resets the step index."""
        self.num_inference_steps = num_inference_steps
        sigmas = self.sd3_time_shift(_linspace_f32(1.0, 0.0, num_inference_steps + 1), time_shift)
        if not self.config.reverse:
            sigmas = np.float32(1.0) - sigmas
        self._sigmas = sigmas
        self._timesteps = sigmas[:-1]
        self._step_index = None

    def index_for_timestep(self, timestep: Union[float, Array]) -> int:
        """Position of `timestep` in the schedule (the second match if it occurs twice, as the reference)."""
        value = np.float32(timestep.asnumpy() if isinstance(timestep, Tensor) else timestep)
        indices = np.flatnonzero(self._timesteps == value)
        if indices.size == 0:
            raise ValueError(f"timestep {float(value)} is not one of the scheduler's timesteps")
        return int(indices[1 if indices.size > 1 else 0])

    def _init_step_index(self, timestep: Union[float, Array]) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def scale_model_input(self, sample: Array, timestep: Optional[float] = None) -> Array:
        return sample

    def step(self, model_output: Array, timestep: Union[float, Array], sample: Array,
             return_dict: bool = False) -> Union[FlowMatchDiscreteSchedulerOutput, Tuple[Array]]:
        """One Euler step: `sample + model_output * (sigma[k+1] - sigma[k])` in float32.

        `timestep` must be one of `timesteps` (it locates the first step). Tensors in,
        Tensor out; numpy arrays in, numpy array out. Returns the previous sample
        itself unless `return_dict` (the reference's default is also a bare value).
        """
        if isinstance(timestep, (int, np.integer)) or (
                isinstance(timestep, (Tensor, np.ndarray)) and not _is_float(timestep.dtype)):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                "`FlowMatchDiscreteScheduler.step()` is not supported. Pass one of `scheduler.timesteps`.")
        if self._step_index is None:
            self._init_step_index(timestep)
        dt = self._sigmas[self._step_index + 1] - self._sigmas[self._step_index]
        if isinstance(sample, np.ndarray):
            prev_sample = sample.astype(np.float32) + model_output.astype(np.float32) * dt
        else:
            prev_sample = sample.astype(ms.float32) + model_output.astype(ms.float32) * Tensor(dt, ms.float32)
        self._step_index += 1
        if not return_dict:
            return prev_sample
        return FlowMatchDiscreteSchedulerOutput(prev_sample=prev_sample)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def _is_float(dtype) -> bool:
    if isinstance(dtype, np.dtype):
        return np.issubdtype(dtype, np.floating)
    return dtype in (ms.float16, ms.bfloat16, ms.float32, ms.float64)
