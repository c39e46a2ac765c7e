"""The Ascend stand-ins against float64 references and the exact CPU kernels, their documented errors,
and the Ascend branches of `backend` (FlashAttentionScore with its mask inversion, fused RmsNorm,
Ascend GELU, LayerNorm-based modulation) run through them on the CPU."""
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, ops

import ascend_standins as standins
from stepvideo import backend

rng = np.random.default_rng(19)
# On an NPU (scripts/ascend_check.sh) the real ops are checked beside the stand-ins, same references.
IMPLEMENTATIONS = [standins] + ([ops] if backend.device() == backend.ASCEND else [])
IDS = ["standin", "mindspore.ops"][:len(IMPLEMENTATIONS)]


def bf16(a) -> Tensor:
    return Tensor(np.asarray(a, np.float32)).astype(ms.bfloat16)


def f32(t: Tensor) -> np.ndarray:
    return t.astype(ms.float32).asnumpy().astype(np.float64)


def softmax64(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def attention64(q, k, v, drop=None, scale=None):
    """(b, s, n, d) float64 reference; drop broadcast to (b, n, s_q, s_k), True = discard."""
    q, k, v = (np.asarray(a, np.float64).transpose(0, 2, 1, 3) for a in (q, k, v))
    s = q @ k.transpose(0, 1, 3, 2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if drop is not None:
        s = np.where(drop, -np.inf, s)
    return (softmax64(s) @ v).transpose(0, 2, 1, 3)


def rel(port, ref) -> float:
    return float(np.abs(port - ref).max() / np.abs(ref).max())


# bf16 inputs are exact in float64; the stand-ins compute in float32 and round the output to bf16
# once: 2^-8 relative on the largest value, plus float32 accumulation.
BF16_OUT = 2.0 ** -8


# --------------------------------------------------------------------------- flash_attention_score


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=IDS)
@pytest.mark.parametrize("layout", ["BSND", "BNSD", "BSH", "SBH"])
def test_flash_attention_layouts_and_discard_mask(layout, impl):
    b, s1, s2, n, d = 2, 5, 7, 2, 16
    q, k, v = (f32(bf16(rng.standard_normal((b, s, n, d)))) for s in (s1, s2, s2))
    drop = rng.random((b, 1, s1, s2)) < 0.3
    drop[..., 0] = False  # every query keeps one key
    ref = attention64(q, k, v, drop, scale=0.25)
    to = {"BSND": lambda x: x, "BNSD": lambda x: x.transpose(0, 2, 1, 3),
          "BSH": lambda x: x.reshape(x.shape[0], x.shape[1], -1),
          "SBH": lambda x: x.transpose(1, 0, 2, 3).reshape(x.shape[1], x.shape[0], -1)}[layout]
    out = impl.flash_attention_score(bf16(to(q)), bf16(to(k)), bf16(to(v)), n, attn_mask=Tensor(drop),
                                     scalar_value=0.25, input_layout=layout)
    assert out.dtype == ms.bfloat16 and tuple(out.shape) == to(q).shape
    err = rel(f32(out), to(ref))
    print(f"flash_attention_score {layout}: relative error {err:.2e}")
    assert err <= BF16_OUT


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=IDS)
def test_flash_attention_mask_shapes_and_grouped_heads(impl):
    b, s, n, d = 1, 6, 4, 32
    q = f32(bf16(rng.standard_normal((b, s, n, d))))
    k, v = (f32(bf16(rng.standard_normal((b, s, 2, d)))) for _ in range(2))  # N2 = 2 divides N1 = 4
    causal_drop = np.triu(np.ones((s, s), bool), 1)  # (S1, S2)
    out = impl.flash_attention_score(bf16(q), bf16(k), bf16(v), n, attn_mask=Tensor(causal_drop),
                                     scalar_value=d ** -0.5, input_layout="BSND")
    ref = attention64(q, np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2), causal_drop)
    assert rel(f32(out), ref) <= BF16_OUT
    per_head = np.broadcast_to(causal_drop, (b, n, s, s)).copy()  # (B, N1, S1, S2), uint8 form
    out8 = impl.flash_attention_score(bf16(q), bf16(k), bf16(v), n, attn_mask=Tensor(per_head.astype(np.uint8)),
                                      scalar_value=d ** -0.5, input_layout="BSND")
    np.testing.assert_array_equal(f32(out8), f32(out))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=IDS)
def test_flash_attention_compressed_causal_modes(impl):
    """sparse_mode 2 (leftUpCausal) and 3 (rightDownCausal) with the 2048 x 2048 compressed mask, S1 < S2."""
    b, s1, s2, n, d = 1, 5, 8, 2, 16
    q, k, v = (f32(bf16(rng.standard_normal((b, s, n, d)))) for s in (s1, s2, s2))
    compressed = Tensor(np.triu(np.ones((2048, 2048), bool), 1))
    i, j = np.arange(s1)[:, None], np.arange(s2)[None, :]
    for mode, drop in ((2, j > i), (3, j > i + s2 - s1)):
        out = impl.flash_attention_score(bf16(q), bf16(k), bf16(v), n, attn_mask=compressed, scalar_value=d ** -0.5,
                                         input_layout="BSND", sparse_mode=mode)
        assert rel(f32(out), attention64(q, k, v, drop[None, None])) <= BF16_OUT, mode
    with pytest.raises(RuntimeError, match=None if impl is not standins else "compressed attn_mask"):
        impl.flash_attention_score(bf16(q), bf16(k), bf16(v), n, attn_mask=Tensor(j > i), input_layout="BSND",
                                   sparse_mode=2)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=IDS)
def test_flash_attention_documented_errors(impl):
    """The documented exception types; the messages are checked for the stand-in only."""
    q = bf16(rng.standard_normal((1, 4, 2, 16)))
    fa = impl.flash_attention_score
    real = impl is not standins
    match = lambda text: None if real else text  # noqa: E731
    with pytest.raises(TypeError, match=match("float16 or bfloat16")):
        fa(q.astype(ms.float32), q.astype(ms.float32), q.astype(ms.float32), 2, input_layout="BSND")
    with pytest.raises(TypeError, match=match("same dtype")):
        fa(q, q.astype(ms.float16), q, 2, input_layout="BSND")
    with pytest.raises(TypeError, match=match("bool or uint8")):
        fa(q, q, q, 2, attn_mask=Tensor(np.zeros((4, 4), np.float32)), input_layout="BSND")
    with pytest.raises(ValueError, match=match("input_layout")):
        fa(q, q, q, 2, input_layout="BSDN")
    with pytest.raises(RuntimeError, match=match("attn_mask shape")):
        fa(q, q, q, 2, attn_mask=Tensor(np.zeros((1, 1, 4), bool)), input_layout="BSND")
    with pytest.raises(RuntimeError, match=match("head_num")):
        fa(q, q, q, 3, input_layout="BSND")
    with pytest.raises(RuntimeError, match=match("greater than 0")):
        fa(q, q, q, 0, input_layout="BSND")
    with pytest.raises(RuntimeError, match=match("multiple of 16")):
        small = bf16(rng.standard_normal((1, 4, 2, 8)))
        fa(small, small, small, 2, input_layout="BSND")
    with pytest.raises(TypeError, match=match("float")):
        fa(q, q, q, 2, scalar_value=1, input_layout="BSND")
    if not real:
        with pytest.raises(NotImplementedError):  # features the stand-in does not model
            fa(q, q, q, 2, keep_prob=0.9, input_layout="BSND")


# --------------------------------------------------------------------------- rms_norm, gelu


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=IDS)
def test_rms_norm_against_float64_and_errors(impl):
    x = f32(bf16(rng.standard_normal((3, 5, 64)) * 2))
    w = f32(bf16(1 + 0.1 * rng.standard_normal(64)))
    y, rstd = impl.rms_norm(bf16(x), bf16(w), 1e-6)
    r = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
    assert y.dtype == ms.bfloat16 and rstd.dtype == ms.float32 and tuple(rstd.shape) == (3, 5, 1)
    assert rel(f32(y), x * r * w) <= BF16_OUT
    assert rel(rstd.asnumpy(), r) <= 1e-6
    y32, _ = impl.rms_norm(Tensor(x.astype(np.float32)), Tensor(w.astype(np.float32)))  # default epsilon
    assert rel(y32.asnumpy(), x * r * w) <= 1e-6
    match = (lambda text: None) if impl is not standins else (lambda text: text)
    with pytest.raises(TypeError, match=match("same dtype")):
        impl.rms_norm(bf16(x), Tensor(w.astype(np.float32)), 1e-6)
    with pytest.raises(ValueError, match=match("epsilon")):
        impl.rms_norm(bf16(x), bf16(w), 0.0)
    with pytest.raises(ValueError, match=match("rank of gamma")):
        impl.rms_norm(bf16(w), bf16(x), 1e-6)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=IDS)
def test_gelu_both_forms_and_errors(impl):
    x = np.linspace(-6, 6, 1201)
    tanh_ref = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    erf_ref = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    assert rel(impl.gelu(Tensor(x.astype(np.float32)), approximate="tanh").asnumpy(), tanh_ref) <= 1e-6
    assert rel(impl.gelu(Tensor(x.astype(np.float32))).asnumpy(), erf_ref) <= 1e-6
    xb = f32(bf16(x))
    out = impl.gelu(bf16(xb), approximate="tanh")
    assert out.dtype == ms.bfloat16
    assert rel(f32(out), 0.5 * xb * (1 + np.tanh(math.sqrt(2 / math.pi) * (xb + 0.044715 * xb ** 3)))) <= BF16_OUT
    match = (lambda text: None) if impl is not standins else (lambda text: text)
    with pytest.raises(ValueError, match=match("approximate")):
        impl.gelu(bf16(x), approximate="erf")
    with pytest.raises(TypeError, match=match("dtype")):
        impl.gelu(Tensor(np.arange(3, dtype=np.int32)))


# --------------------------------------------------------------------------- backend's Ascend branches


@pytest.fixture
def ascend_bf16():
    """The Ascend table (stand-ins) with bf16 compute, as on the NPU."""
    with backend.using(standins.ascend_table(compute_dtype=ms.bfloat16)) as table:
        yield table


def test_attention_takes_flash_branch_with_row_masks(ascend_bf16, monkeypatch):
    """backend.attention's FlashAttentionScore branch: (b, 1, s_k) keep-mask inverted and broadcast."""
    calls = []
    real = standins.flash_attention_score
    monkeypatch.setattr(standins, "flash_attention_score", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    q = f32(bf16(rng.standard_normal((2, 5, 2, 16))))
    k, v = (f32(bf16(rng.standard_normal((2, 6, 2, 16)))) for _ in range(2))
    keep = np.arange(6)[None, None, :] < np.array([6, 2])[:, None, None]  # (b, 1, s_k), True = attend
    out = backend.attention(bf16(q), bf16(k), bf16(v), mask=Tensor(keep))
    assert calls and calls[0]["input_layout"] == "BSND" and tuple(calls[0]["attn_mask"].shape) == (2, 1, 5, 6)
    exact = backend.exact_attention(bf16(q), bf16(k), bf16(v), Tensor(keep), False, None, 16 ** -0.5)
    assert out.dtype == ms.bfloat16
    assert rel(f32(out), attention64(q, k, v, ~keep[:, None])) <= BF16_OUT
    assert rel(f32(out), f32(exact)) <= 2 * BF16_OUT


def test_attention_flash_branch_causal_and_4d_mask(ascend_bf16, monkeypatch):
    calls = []
    real = standins.flash_attention_score
    monkeypatch.setattr(standins, "flash_attention_score", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    q, k, v = (f32(bf16(rng.standard_normal((1, 7, 2, 16)))) for _ in range(3))
    i, j = np.arange(7)[:, None], np.arange(7)[None, :]
    out = backend.attention(bf16(q), bf16(k), bf16(v), causal=True)  # VAE mid-block form
    assert rel(f32(out), attention64(q, k, v, (j > i)[None, None])) <= BF16_OUT
    # causal alone: the compressed 2048 x 2048 mask, not an (S, S) one (1.8 GB for the VAE at 544 x 992)
    assert calls[-1]["sparse_mode"] == 2 and tuple(calls[-1]["attn_mask"].shape) == (2048, 2048)
    keep = rng.random((1, 2, 7, 7)) < 0.7
    keep[..., 0] = True
    out = backend.attention(bf16(q), bf16(k), bf16(v), mask=Tensor(keep), causal=True)
    assert rel(f32(out), attention64(q, k, v, ~keep | (j > i)[None, None])) <= BF16_OUT
    assert "sparse_mode" not in calls[-1] and tuple(calls[-1]["attn_mask"].shape) == (1, 2, 7, 7)


def test_attention_with_bias_or_fp32_takes_exact_branch(ascend_bf16, monkeypatch):
    monkeypatch.setattr(standins, "flash_attention_score", None)  # any call would fail
    q, k, v = (rng.standard_normal((1, 4, 2, 16)).astype(np.float32) for _ in range(3))
    out = backend.attention(Tensor(q), Tensor(k), Tensor(v))  # fp32 (CLIP): exact
    assert rel(out.asnumpy(), attention64(q, k, v)) <= 1e-6
    bias = Tensor(np.zeros((1, 2, 4, 4), np.float32))
    out = backend.attention(bf16(q), bf16(k), bf16(v), causal=True, bias=bias)  # Step-LLM's ALiBi form
    assert out.dtype == ms.bfloat16


def test_rms_norm_gelu_and_modulation_take_fused_branches(ascend_bf16):
    x = f32(bf16(rng.standard_normal((2, 3, 64))))
    w = f32(bf16(1 + 0.1 * rng.standard_normal(64)))
    out = backend.rms_norm(bf16(x), bf16(w), 1e-6)
    assert out.dtype == ms.bfloat16
    assert rel(f32(out), x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w) <= BF16_OUT
    assert rel(f32(backend.gelu_tanh(bf16(x))),
               0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))) <= BF16_OUT
    # no weight: the explicit fp32 branch (in fp32: its bf16 product needs the NPU's bf16 Mul)
    ref = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
    assert rel(backend.rms_norm(Tensor(x.astype(np.float32)), None, 1e-6).asnumpy(), ref) <= 1e-6
    scale, shift = rng.standard_normal((2, 1, 64)) * 0.1, rng.standard_normal((2, 1, 64)) * 0.1
    t = lambda a: Tensor(np.asarray(a, np.float32))  # noqa: E731
    mod = backend.modulated_layer_norm(t(x), None, None, 1e-6, t(scale), t(shift))
    mu = x.mean(-1, keepdims=True)
    ref = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * (1 + scale) + shift
    assert rel(mod.asnumpy(), ref) <= 1e-5


def test_install_swaps_and_restores_the_table():
    before = backend.kernels()
    table = standins.ascend_table()
    with backend.using(table):
        assert backend.kernels() is table and backend.info().kernels == "ascend-standin"
        assert backend.info().device == backend.CPU
    assert backend.kernels() is before
    with pytest.raises(TypeError, match="Kernels"):
        backend.install({"attention": None})


# --------------------------------------------------------------------------- which Ascend NPU


@pytest.mark.parametrize("soc", ["Ascend910B1", "Ascend910B2", "Ascend910B2C", "Ascend910B3", "Ascend910B4",
                                 "Ascend910B4-1", "Ascend910_9391", "Ascend910_9382"])
def test_atlas_a2_and_a3_npus_are_accepted(soc):
    """The 910B branch of `backend.init`: the SoC name MindSpore reports, accepted unchanged."""
    assert backend.check_ascend_soc(soc, 3) == soc


@pytest.mark.parametrize("soc", ["Ascend910A", "Ascend910B", "Ascend910ProA", "Ascend910ProB", "Ascend910PremiumA"])
def test_first_generation_910_is_refused_naming_found_and_required(soc):
    """The 910A branch: no bf16 compute, no FlashAttentionScore; refused before any model loads.
    ("Ascend910B" without a digit is a first-generation part, not an Atlas A2 NPU.)"""
    with pytest.raises(RuntimeError) as refused:
        backend.check_ascend_soc(soc, 3)
    message = str(refused.value)
    assert f"Ascend device 3 is {soc!r}: a first-generation Ascend 910" in message
    assert "no bf16 compute and no FlashAttentionScore" in message
    assert "needs an Atlas A2/A3 training NPU (Ascend910B1-B4 or Ascend910_93xx" in message


@pytest.mark.parametrize("soc", ["Ascend310P3", "", "Ascend950PR"])
def test_other_npus_are_refused(soc):
    with pytest.raises(RuntimeError, match=rf"Ascend device 0 is {soc!r}: not an Ascend NPU with bf16 compute"):
        backend.check_ascend_soc(soc)
