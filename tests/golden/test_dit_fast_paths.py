"""The DiT's speed paths give the golden numbers too: compiled blocks (`set_jit`), RoPE tables made once
per forward, and a replaced attention hook that still runs eagerly between the compiled pieces."""
import numpy as np
import pytest

from dit_fixtures import fixtures, model, call_kwargs, transformer_folder
from stepvideo import backend
from stepvideo.modules.model import StepVideoModel
from support import assert_parity, load


def test_compiled_blocks_match_golden_and_eager(model, fixtures, in_tmp):
    inputs, outputs = fixtures
    kw = call_kwargs(inputs, "c1")
    eager = model(**kw, return_dict=False).asnumpy()
    try:
        model.set_jit(True)
        assert all(block.jit_enabled for block in model.transformer_blocks)
        compiled = model(**kw, return_dict=False).asnumpy()
    finally:
        model.set_jit(False)
    assert_parity(compiled, outputs["c1.output"], "c1.output (compiled blocks)")
    diff = float(np.abs(compiled - eager).max())
    print(f"compiled vs eager: max |diff| = {diff:.3e}")
    # Compiled kernels may order a few reductions differently: 10x inside the golden tolerance.
    assert diff <= 1e-5 * max(1.0, float(np.abs(eager).max()))


def test_rope_tables_once_equal_grid_per_block(model, fixtures):
    """block_forward makes the tables once; a block given the raw grid makes its own: same numbers."""
    inputs, outputs = fixtures
    e = model.embed(**call_kwargs(inputs, "c2"))
    once = model.block_forward(e.hidden_states, e.encoder_hidden_states, e.timestep, e.rope_grid, e.attn_mask)
    x = e.hidden_states
    for block in model.transformer_blocks:
        x = block(x, e.encoder_hidden_states, e.timestep, e.attn_mask, e.rope_grid)
    np.testing.assert_array_equal(once.asnumpy(), x.asnumpy())
    assert_parity(once, outputs[f"c2.block_{len(model.transformer_blocks) - 1}_out"], "c2 last block (tables once)")


def test_replaced_hook_runs_eagerly_between_compiled_pieces(model, fixtures, in_tmp):
    """A replacement core attention (as Ulysses installs) is called with (b, n, heads, d) tensors under jit."""
    inputs, outputs = fixtures
    seen = []

    def hook(q, k, v):
        seen.append(tuple(q.shape))
        return backend.attention(q, k, v)

    kw = call_kwargs(inputs, "c0")
    try:
        model.set_jit(True)
        for block in model.transformer_blocks:
            block.attn1.core_attention = hook
        out = model(**kw, return_dict=False)
    finally:
        model.set_jit(False)
        for block in model.transformer_blocks:
            block.attn1.core_attention = backend.attention
    b, f, _, h, w = kw["hidden_states"].shape
    heads = model.config.num_attention_heads
    assert seen == [(b, f * h * w, heads, model.config.attention_head_dim)] * len(model.transformer_blocks)
    assert_parity(out, outputs["c0.output"], "c0.output (compiled blocks, replaced hook)")


@pytest.mark.parametrize("offset", [0.0, 30.0], ids=["centred", "large-mean"])
def test_modulated_layer_norm_against_float64(offset):
    """The CPU form (matrix-vector mean and centred variance, affine folded into the modulation)."""
    from mindspore import Tensor
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 64, 96)) * 2.0 + offset
    w, b = 1 + 0.1 * rng.standard_normal(96), 0.1 * rng.standard_normal(96)
    scale, shift = 0.2 * rng.standard_normal((2, 1, 96)), 0.2 * rng.standard_normal((2, 1, 96))
    mean = x.mean(-1, keepdims=True)
    ref = ((x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b) * (1 + scale) + shift
    f32 = lambda a: Tensor(a.astype(np.float32))  # noqa: E731
    out = backend.modulated_layer_norm(f32(x), f32(w), f32(b), 1e-5, f32(scale), f32(shift))
    assert_parity(out, ref, f"modulated_layer_norm ({offset=})")
    plain = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6) * (1 + scale) + shift
    out = backend.modulated_layer_norm(f32(x), None, None, 1e-6, f32(scale), f32(shift))
    assert_parity(out, plain, f"modulated_layer_norm without affine ({offset=})")
