"""stepvideo/dtypes.py against MindSpore's own bf16 and dtypes; stepvideo/contracts.py's accepted and refused inputs."""
import mindspore as ms
import numpy as np
import pytest

from stepvideo import dtypes
from stepvideo.contracts import PromptError, check_latent_shape, check_latents, check_prompts


def test_every_row_names_one_type_in_every_format():
    for table in (dtypes.BY_NAME, dtypes.BY_SAFETENSORS, dtypes.BY_TORCH_STORAGE):
        assert len(table) == len(dtypes.TABLE)
    for row in dtypes.TABLE:
        ms_dtype = dtypes.mindspore_dtype(row)
        assert dtypes.of_mindspore(ms_dtype) is row
        # The stored bytes have the MindSpore type's width (bf16: 2 bytes of bits).
        assert ms.Tensor(np.zeros(3, np.float32)).astype(ms_dtype).itemsize == row.itemsize, row.name
        if row is not dtypes.BF16:
            assert dtypes.of_array(np.zeros(2, row.numpy)) is row
            assert dtypes.of_array(np.zeros(2, row.numpy.newbyteorder(">"))) is row
    assert dtypes.of_array(np.zeros(2, np.uint16)) is None  # bf16 bits are told apart by the caller
    with pytest.raises(TypeError, match="no element type"):
        dtypes.of_mindspore(ms.complex64)


def test_bf16_bits_agree_with_mindspore():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(1000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 1000),
                        np.array([0.0, -0.0, np.inf, -np.inf, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8], np.float32)])
    theirs = ms.Tensor(x).astype(ms.bfloat16)
    bits = dtypes.f32_to_bf16_bits(x)  # round to nearest even
    np.testing.assert_array_equal(bits, theirs.asnumpy().view(np.uint16))
    np.testing.assert_array_equal(dtypes.bf16_bits_to_f32(bits), theirs.astype(ms.float32).asnumpy())
    viewed = ms.Tensor.from_numpy(dtypes.mindspore_bf16(bits))
    assert viewed.dtype == ms.bfloat16
    np.testing.assert_array_equal(viewed.astype(ms.float32).asnumpy(), theirs.astype(ms.float32).asnumpy())
    assert dtypes.f32_to_bf16_bits(np.array([np.nan], np.float32))[0] == 0x7FC0


@pytest.mark.parametrize("prompts, expected", [("a cat", ["a cat"]), ("", [""]), (("a", "b"), ["a", "b"]),
                                               (["x", ""], ["x", ""])])
def test_prompts_accepted(prompts, expected):
    assert check_prompts(prompts) == expected


@pytest.mark.parametrize("prompts, message", [([], "expected at least one prompt, got an empty list"),
                                              (None, "got NoneType"), ({"a": 1}, "got dict"),
                                              (["ok", 3], r"prompts\[1\] must be a string, got int")])
def test_prompts_refused_as_type_and_value_errors(prompts, message):
    for kind in (TypeError, ValueError, PromptError):
        with pytest.raises(kind, match=message):
            check_prompts(prompts)


def test_latents_contract():
    z = np.random.default_rng(0).standard_normal((1, 3, 4, 2, 2)).astype(np.float32)
    bf = ms.Tensor(z).astype(ms.bfloat16)
    widened = check_latents(bf.asnumpy(), channels=4)  # MindSpore's numpy bf16, widened exactly
    np.testing.assert_array_equal(widened, bf.astype(ms.float32).asnumpy())
    np.testing.assert_array_equal(check_latents(bf, channels=4), widened)
    assert check_latents(z.astype(np.float64), channels=4).dtype == np.float32
    for bad in (np.zeros((1, 3, 5, 2, 2), np.float32), np.zeros((1, 0, 4, 2, 2), np.float32),
                np.zeros((3, 4, 2, 2), np.float32)):
        with pytest.raises(ValueError, match=r"latents must be \(b, T, 4, h, w\), got shape"):
            check_latents(bad, channels=4)
    with pytest.raises(ValueError, match="floating point"):
        check_latents(np.zeros((1, 3, 4, 2, 2), np.int64), channels=4)
    with pytest.raises(ValueError, match=r"z must be \(2, T, 4, h, w\), got shape \(1, 3, 4, 2, 2\)"):
        check_latent_shape((1, 3, 4, 2, 2), 4, "z", batch=2)
