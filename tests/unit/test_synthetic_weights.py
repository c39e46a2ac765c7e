"""The weight-generation rule against the VAE fixture's manifest (the small tensors; the golden
VAE test checks every tensor) and against a direct, unblocked transcription of the rule."""
import json
import math
import zlib

import numpy as np
import pytest

import synthetic_weights
from synthetic_weights import rule_kind, rule_seed, rule_tensor, rule_weights
from support import golden

MANIFEST = json.loads((golden("vae") / "weights_manifest.json").read_text())
SMALL = [e for e in MANIFEST["tensors"] if math.prod(e["shape"]) <= 300_000]


def test_small_manifest_tensors_match():
    weights = rule_weights({e["key"]: e["shape"] for e in SMALL}, salt=MANIFEST["salt"])
    assert {"bias", "norm_weight", "fan_in"} == {e["rule"] for e in SMALL}
    for e in SMALL:
        w = weights[e["key"]]
        assert w.dtype == np.float32 and list(w.shape) == e["shape"], e["key"]
        assert rule_seed(e["key"], MANIFEST["salt"]) == e["seed"], e["key"]
        assert rule_kind(e["key"], e["shape"]) == e["rule"], e["key"]
        assert w.reshape(-1)[:4].tolist() == e["first4"], e["key"]
        assert math.isclose(float(w.sum(dtype=np.float64)), e["sum"], rel_tol=1e-12, abs_tol=1e-9), e["key"]
        assert math.isclose(float(np.abs(w).sum(dtype=np.float64)), e["abs_sum"], rel_tol=1e-12), e["key"]


def _direct(key, shape, salt):
    x = np.random.default_rng(zlib.crc32((salt + key).encode("utf-8"))).standard_normal(size=shape)
    if key.endswith(".bias"):
        w = 0.05 * x
    elif len(shape) == 1:
        w = 1.0 + 0.1 * x
    else:
        w = x / math.sqrt(math.prod(shape[1:]))
    return w.astype(np.float32)


@pytest.mark.parametrize("key,shape", [("a.conv.weight", (7, 5, 3, 3)), ("a.norm.weight", (1000,)),
                                       ("a.conv.bias", (33,)), ("é.weight", (2, 3))])
def test_blocked_generation_equals_the_direct_rule(monkeypatch, key, shape):
    monkeypatch.setattr(synthetic_weights, "_BLOCK_ELEMENTS", 97)  # many uneven blocks
    np.testing.assert_array_equal(rule_tensor(key, shape, salt="s:"), _direct(key, shape, "s:"))


def test_salt_changes_the_weights_and_scalars_are_rejected():
    assert not np.array_equal(rule_tensor("w.weight", (4, 4)), rule_tensor("w.weight", (4, 4), salt="x"))
    with pytest.raises(ValueError, match="scalar"):
        rule_tensor("logit_scale", ())
