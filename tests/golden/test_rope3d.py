"""RoPE3D against the golden fixtures of the original (rope3d c0..c2)."""
import numpy as np
import pytest
from mindspore import Tensor

from stepvideo.modules.rope import RoPE3D
from support import assert_parity, cases, load

CASES = {c["name"]: c for c in cases("rope3d")["cases"]}


@pytest.fixture(scope="module")
def fixtures():
    return load("rope3d", "inputs"), load("rope3d", "outputs")


@pytest.mark.parametrize("name", sorted(CASES))
def test_rope3d_parity(fixtures, name):
    inputs, outputs = fixtures
    case = CASES[name]
    rope = RoPE3D(freq=1e4, F0=1.0, scaling_factor=1.0)
    out = rope(Tensor(inputs[f"{name}.tokens"]), case["rope_positions"], case["ch_split"])
    assert_parity(out, outputs[f"{name}.out"], f"rope3d {name}.out")


@pytest.mark.parametrize("name", sorted(CASES))
def test_rope3d_sliced_grid_matches_slice_of_full(fixtures, name):
    """What sequence parallelism does: rotate a token slice with the same slice of the grid."""
    inputs, outputs = fixtures
    case = CASES[name]
    tokens = inputs[f"{name}.tokens"]
    n = tokens.shape[1]
    grid = RoPE3D.position_grid(*case["rope_positions"])
    rope = RoPE3D()
    lo, hi = n // 3, n - n // 4
    part = rope.apply(Tensor(tokens[:, lo:hi]), grid[lo:hi], case["ch_split"])
    assert_parity(part, outputs[f"{name}.out"][:, lo:hi], f"rope3d {name}.out[{lo}:{hi}] via sliced grid")


def test_position_grid_is_frame_major():
    grid = RoPE3D.position_grid(2, 3, 4).asnumpy()
    n = np.arange(24)
    expected = np.stack([n // 12, (n // 4) % 3, n % 4], axis=-1)
    np.testing.assert_array_equal(grid, expected)


def test_batch_size_change_on_one_instance(fixtures):
    """The original cached the grid expanded to the first batch size; 2 then 1 must work."""
    inputs, outputs = fixtures
    rope = RoPE3D()
    case = CASES["c1"]
    both = rope(Tensor(inputs["c1.tokens"]), case["rope_positions"], case["ch_split"])
    first = rope(Tensor(inputs["c1.tokens"][1:]), case["rope_positions"], case["ch_split"])
    assert_parity(both, outputs["c1.out"], "rope3d c1 batch 2")
    assert_parity(first, outputs["c1.out"][1:], "rope3d c1 row 1 alone")


def test_rope3d_rejects_wrong_split_and_grid(fixtures):
    inputs, _ = fixtures
    tokens = Tensor(inputs["c0.tokens"])
    rope = RoPE3D()
    with pytest.raises(ValueError, match="ch_split"):
        rope(tokens, [2, 3, 4], [64, 32, 16])
    with pytest.raises(ValueError, match="rope_positions"):
        rope(tokens, [2, 3, 5], [64, 32, 32])
    with pytest.raises(ValueError, match="grid"):
        rope.apply(tokens, RoPE3D.position_grid(1, 3, 4), [64, 32, 32])
