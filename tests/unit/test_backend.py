"""Backend kernels and layers against float64 numpy references (relative error <= 1e-5)."""
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from stepvideo import backend, layers

RTOL = 1e-5
rng = np.random.default_rng(1234)


def rel_err(port, ref):
    port = port.asnumpy().astype(np.float64)
    return float(np.abs(port - ref).max() / max(np.abs(ref).max(), 1e-30))


def report(name, err):
    print(f"backend {name}: relative error {err:.2e}")
    assert err <= RTOL, f"{name}: relative error {err:.2e} > {RTOL:.0e}"


def t(x):
    return Tensor(np.asarray(x, np.float32))


def softmax64(s):
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def attention64(q, k, v, keep=None, bias=None, scale=None):
    q, k, v = (a.astype(np.float64).transpose(0, 2, 1, 3) for a in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(0, 1, 3, 2) * scale
    if bias is not None:
        s = s + bias
    if keep is not None:
        s = np.where(keep, s, -np.inf)
    return (softmax64(s) @ v).transpose(0, 2, 1, 3)


def test_device_is_cpu_and_fp32_here():
    info = backend.info()
    assert info.device == backend.CPU
    assert info.compute_dtype == ms.float32


def test_init_rejects_unknown_device():
    with pytest.raises(ValueError, match="expected 'cpu' or 'ascend'"):
        backend.init("gpu")


def test_attention_plain():
    q, k, v = (rng.standard_normal((2, 7, 3, 16)).astype(np.float32) for _ in range(3))
    report("attention", rel_err(backend.attention(t(q), t(k), t(v)), attention64(q, k, v)))


def test_attention_cross_lengths_and_row_mask():
    q = rng.standard_normal((2, 5, 2, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 6, 2, 8)).astype(np.float32) for _ in range(2))
    counts = np.array([6, 2])
    keep = np.arange(6)[None, None, :] < counts[:, None, None]  # (b, 1, s_k): one mask per row
    out = backend.attention(t(q), t(k), t(v), mask=Tensor(keep))
    ref = attention64(q, k, v, keep=keep[:, None])
    report("attention+mask", rel_err(out, ref))


def test_attention_causal_with_bias():
    q, k, v = (rng.standard_normal((1, 9, 4, 8)).astype(np.float32) for _ in range(3))
    i, j = np.arange(9)[:, None], np.arange(9)[None, :]
    slopes = 2.0 ** -np.arange(1, 5)
    bias = -slopes[:, None, None] * np.sqrt(np.maximum(i - j, 0))[None]
    out = backend.attention(t(q), t(k), t(v), causal=True, bias=t(bias[None]))
    ref = attention64(q, k, v, keep=(j <= i)[None, None], bias=bias[None])
    report("attention causal+bias", rel_err(out, ref))


def test_gelu_tanh():
    x = np.linspace(-8, 8, 4001)
    ref = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    # relative to max|ref| over a wide range, plus a pointwise check near zero where values are small
    report("gelu_tanh", rel_err(backend.gelu_tanh(t(x)), ref))
    small = np.linspace(-1, 1, 201)
    ref_s = 0.5 * small * (1 + np.tanh(math.sqrt(2 / math.pi) * (small + 0.044715 * small**3)))
    err = np.abs(backend.gelu_tanh(t(small)).asnumpy() - ref_s).max()
    assert err < 1e-6, f"gelu_tanh near 0: abs error {err:.2e}"


def test_layer_norm_affine_and_plain():
    x = rng.standard_normal((3, 5, 64)) * 3 + 1
    w, b = rng.standard_normal(64), rng.standard_normal(64)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    ref = (x - mu) / np.sqrt(var + 1e-5) * w + b
    ln = layers.LayerNorm(64, eps=1e-5)
    ln.weight.set_data(t(w))
    ln.bias.set_data(t(b))
    report("LayerNorm", rel_err(ln(t(x)), ref))
    plain = layers.LayerNorm(64, eps=1e-6, elementwise_affine=False)
    assert not list(plain.get_parameters()), "a LayerNorm without affine has no parameters"
    report("LayerNorm no affine", rel_err(plain(t(x)), (x - mu) / np.sqrt(var + 1e-6)))


def test_rms_norm():
    x = rng.standard_normal((4, 3, 128)) * 2
    w = rng.standard_normal(128)
    ref = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w
    norm = layers.RMSNorm(128, eps=1e-6)
    norm.weight.set_data(t(w))
    report("RMSNorm", rel_err(norm(t(x)), ref))


def test_embedding():
    table = rng.standard_normal((50, 16))
    ids = rng.integers(0, 50, (2, 7))
    emb = layers.Embedding(50, 16)
    emb.weight.set_data(t(table))
    report("Embedding", rel_err(emb(Tensor(ids.astype(np.int64))), table[ids]))


def test_group_norm():
    x = rng.standard_normal((2, 8, 3, 4, 5))
    w, b = rng.standard_normal(8), rng.standard_normal(8)
    g = x.reshape(2, 4, -1)
    ref = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    ref = ref * w[None, :, None, None, None] + b[None, :, None, None, None]
    gn = layers.GroupNorm(4, 8)
    gn.weight.set_data(t(w))
    gn.bias.set_data(t(b))
    report("GroupNorm", rel_err(gn(t(x)), ref))


def conv3d64(x, w, b, pad):
    pt, ph, pw = pad
    x = np.pad(x, ((0, 0), (0, 0), (pt, pt), (ph, ph), (pw, pw)))
    n, _, T, H, W = x.shape
    o, _, kt, kh, kw = w.shape
    out = np.zeros((n, o, T - kt + 1, H - kh + 1, W - kw + 1))
    for dt in range(kt):
        for dh in range(kh):
            for dw in range(kw):
                patch = x[:, :, dt:dt + out.shape[2], dh:dh + out.shape[3], dw:dw + out.shape[4]]
                out += np.einsum("ncthw,oc->nothw", patch, w[:, :, dt, dh, dw])
    return out + b[None, :, None, None, None]


def test_conv3d_and_conv2d():
    x = rng.standard_normal((1, 3, 4, 6, 5))
    w, b = rng.standard_normal((4, 3, 3, 3, 3)), rng.standard_normal(4)
    conv = layers.Conv3d(3, 4, 3, padding=(0, 1, 1))
    conv.weight.set_data(t(w))
    conv.bias.set_data(t(b))
    report("Conv3d", rel_err(conv(t(x)), conv3d64(x, w, b, (0, 1, 1))))
    x2 = rng.standard_normal((2, 3, 5, 6))
    w2, b2 = rng.standard_normal((4, 3, 1, 1)), rng.standard_normal(4)
    conv2 = layers.Conv2d(3, 4, 1)
    conv2.weight.set_data(t(w2))
    conv2.bias.set_data(t(b2))
    ref2 = np.einsum("nchw,oc->nohw", x2, w2[:, :, 0, 0]) + b2[None, :, None, None]
    report("Conv2d", rel_err(conv2(t(x2)), ref2))


def test_linear():
    x = rng.standard_normal((2, 3, 32))
    w, b = rng.standard_normal((16, 32)), rng.standard_normal(16)
    lin = layers.Linear(32, 16)
    lin.weight.set_data(t(w))
    lin.bias.set_data(t(b))
    report("Linear", rel_err(lin(t(x)), x @ w.T + b))


def test_layers_allocate_nothing_until_loaded():
    import psutil

    proc = psutil.Process()
    before = proc.memory_info().rss
    big = [layers.Linear(8192, 8192, bias=False) for _ in range(8)]  # 2 GiB if allocated
    grown = proc.memory_info().rss - before
    assert grown < 64 * 2**20, f"building 2 GiB of lazy parameters grew RSS by {grown / 2**20:.0f} MiB"
    assert big[0].weight.shape == (8192, 8192)
