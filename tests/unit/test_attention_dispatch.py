"""Every attention in the models goes through its module's `core_attention` hook and, by default, through
the active kernel table's `attention`: DiT self- and cross-attention, Step-LLM, CLIP and the VAE."""
from dataclasses import replace

import numpy as np
import pytest
from mindspore import Tensor

from stepvideo import backend
from stepvideo.modules.blocks import CrossAttention, SelfAttention
from stepvideo.modules.rope import RoPE3D
from stepvideo.text_encoder.clip import BertSelfAttention
from stepvideo.text_encoder.stepllm import MultiQueryAttention, alibi_bias
from stepvideo.vae.vae import AttnBlock

rng = np.random.default_rng(20)


def randomise(cell):
    for p in cell.get_parameters():
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.1))
    return cell


def t(*shape):
    return Tensor(rng.standard_normal(shape).astype(np.float32))


def call_sites():
    """(name, module, its inputs, expected keywords of the attention call)."""
    text_keep = Tensor(np.array([[[True, True, False]]]))
    alibi = alibi_bias(4, 5)
    return [
        ("DiT self-attention", randomise(SelfAttention(256, 128)), (t(1, 4, 256), RoPE3D.position_grid(1, 2, 2)),
         dict(mask=None, causal=False, bias=None)),
        ("DiT cross-attention", randomise(CrossAttention(256, 128)), (t(1, 4, 256), t(1, 3, 256), text_keep),
         dict(mask=text_keep, causal=False, bias=None)),
        ("Step-LLM", randomise(MultiQueryAttention(64, 4, 2)), (t(1, 5, 64), alibi),
         dict(mask=None, causal=True, bias=alibi)),
        ("CLIP", randomise(BertSelfAttention(32, 2)), (t(2, 3, 32), text_keep),
         dict(mask=text_keep, causal=False, bias=None)),
        ("VAE mid-block", randomise(AttnBlock(32, 4)), (t(1, 32, 2, 2, 2),), dict(mask=None, causal=True, bias=None)),
    ]


@pytest.mark.parametrize("index", range(5), ids=[c[0] for c in call_sites()])
def test_attention_goes_through_the_table_and_the_hook(index):
    name, module, inputs, expected = call_sites()[index]
    seen = []
    table = backend.kernels()

    def recording(q, k, v, mask, causal, bias, scale):
        seen.append(dict(mask=mask, causal=causal, bias=bias, scale=scale, q=tuple(q.shape)))
        return table.attention(q, k, v, mask, causal, bias, scale)

    with backend.using(replace(table, name="recording", attention=recording)):
        reference = module(*inputs)
    assert len(seen) == 1, f"{name}: {len(seen)} calls through the table"
    for key, value in expected.items():
        assert seen[0][key] is value, f"{name}: {key}={seen[0][key]!r}, expected {value!r}"
    assert seen[0]["scale"] == pytest.approx(seen[0]["q"][-1] ** -0.5)

    hooked = []

    def hook(q, k, v, **kwargs):
        hooked.append(kwargs)
        return backend.attention(q, k, v, **kwargs)

    module.core_attention = hook
    np.testing.assert_array_equal(module(*inputs).asnumpy(), reference.asnumpy())
    assert len(hooked) == 1, f"{name}: the core_attention hook was not used"
