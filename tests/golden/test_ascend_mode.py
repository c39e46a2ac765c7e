"""The golden tests of the DiT, Step-LLM, CLIP and the VAE's mid-block attention with the Ascend kernel
table on the CPU (stand-ins for the Ascend-only calls, `ascend_standins.py`): once in float32, where the
golden tolerances hold unchanged, and once in bf16, measured against the original's own bf16 run
(`dit_bf16/`) and the float32 fixtures. bf16 is the emulation on a CPU and real bf16 on an NPU
(scripts/ascend_check.sh runs `-k bf16` there).

bf16 bounds: measured errors (max|port - ref| / max(1, max|ref|)) and the bounds set from them are
tabulated in docs/ascend.md; each bound is about 1.5x the largest error measured for that kind of
tensor, and the original's own bf16-vs-fp32 distance (0.3-1%) is the scale they are compared with.
"""
import mindspore as ms
import pytest
from mindspore import Tensor

import ascend_standins as standins
from dit_fixtures import call_kwargs, transformer_folder
from stepvideo import backend
from stepvideo.modules.model import StepVideoModel
from stepvideo.text_encoder.clip import HunyuanClip
from stepvideo.text_encoder.stepllm import STEP1TextEncoder
from stepvideo.vae.vae import AttnBlock
from support import assert_parity, cases, golden, load, parity_error
from synthetic_weights import rule_weights

DIT_CASES = ("c0", "c1", "c2")
DIT_TENSORS = ("patch_embed", "adaln_timestep", "block_0_out", "block_1_out", "output")
# bf16 emulation bounds, from the measurements in docs/ascend.md (scaled error as in support.parity_error)
BF16_DIT_VS_ORIGINAL_BF16 = 0.012
BF16_DIT_VS_FP32 = 0.01
BF16_STEP_LLM_VS_FP32 = 0.015
BF16_VAE_ATTENTION_VS_FP32 = 0.005


@pytest.fixture(scope="module")
def standin_fp32():
    with backend.using(standins.ascend_table()) as table:
        yield table


def dit_intermediates(model, kw):
    """The tensors of DIT_TENSORS for one call, computed step by step as test_dit does."""
    e = model.embed(**kw)
    out = {"patch_embed": model.patchfy(kw["hidden_states"].astype(model.dtype)), "adaln_timestep": e.modulation}
    x = e.hidden_states
    for i in range(len(model.transformer_blocks)):
        x = model.block_forward(x, e.encoder_hidden_states, e.modulation, e.rope_grid, e.attn_mask,
                                blocks=range(i, i + 1))
        out[f"block_{i}_out"] = x
    out["output"] = model.final_layer(x, e.embedded_timestep, e.frames, e.height, e.width)
    return out


# --------------------------------------------------------------------------- float32 with the stand-ins


def test_dit_standin_fp32_eager_and_compiled(standin_fp32, tmp_path, in_tmp):
    """The golden DiT with the Ascend table (fused RmsNorm, Ascend GELU, LayerNorm modulation): eager c0,
    compiled c1 (the stand-ins inside the compiled block graphs)."""
    model = StepVideoModel.from_pretrained(transformer_folder(tmp_path / "transformer"))
    inputs, outputs = load("dit", "inputs"), load("dit", "outputs")
    for name, value in dit_intermediates(model, call_kwargs(inputs, "c0")).items():
        assert_parity(value, outputs[f"c0.{name}"], f"c0.{name} (stand-ins)")
    model.set_jit(True)
    assert_parity(model(**call_kwargs(inputs, "c1"), return_dict=False), outputs["c1.output"],
                  "c1.output (stand-ins, compiled)")


def test_step_llm_standin_fp32(standin_fp32, tmp_path):
    from test_step_llm import model_folder

    encoder = STEP1TextEncoder(model_folder(tmp_path / "step_llm", "single"))
    batch = sorted(cases("step_llm")["encoder_batches"])[0]
    y, _ = encoder(cases("step_llm")["encoder_batches"][batch])
    assert_parity(y, load("step_llm", "outputs")[f"{batch}.y"], f"{batch}.y (stand-ins)")


def test_clip_standin_fp32(standin_fp32):
    """CLIP stays float32 on Ascend: the Ascend table gives it the exact attention."""
    clip = HunyuanClip(golden("clip") / "hunyuan_clip", max_length=77)
    batch = sorted(cases("clip")["batches"])[0]
    hidden, pooled = clip(cases("clip")["batches"][batch])
    outputs = load("clip", "outputs")
    assert_parity(hidden, outputs[f"{batch}.last_hidden_state"], f"{batch}.last_hidden_state (stand-ins)")
    assert_parity(pooled, outputs[f"{batch}.pooler_output"], f"{batch}.pooler_output (stand-ins)")


def vae_mid_attention(side: str) -> AttnBlock:
    """The encoder's or decoder's mid-block attention of the golden VAE (512 channels, golden-rule weights)."""
    import json

    manifest = json.loads((golden("vae") / "weights_manifest.json").read_text())
    prefix = f"{side}.mid.attn_1."
    shapes = {e["key"]: e["shape"] for e in manifest["tensors"] if e["key"].startswith(prefix)}
    block = AttnBlock(512, 32)
    weights = rule_weights(shapes, salt=manifest["salt"])
    params = dict(block.parameters_and_names())
    for key, value in weights.items():
        param = params[key[len(prefix):]]
        param.set_data(Tensor(value).astype(param.dtype))
    return block


def test_vae_mid_attention_standin_fp32(standin_fp32):
    outputs = load("vae", "outputs")
    out = vae_mid_attention("decoder")(Tensor(outputs["d0.mid_block_1_out"]))
    assert_parity(out, outputs["d0.mid_attn_1_out"], "d0.mid_attn_1_out (stand-ins)")


# --------------------------------------------------------------------------- bf16 emulation


@pytest.fixture(scope="module")
def bf16_mode():
    """True when emulating bf16 on a CPU; False on an NPU, whose Ascend table computes in bf16 itself."""
    if backend.device() == backend.ASCEND:
        yield False
        return
    with backend.using(standins.bf16_emulation(standins.ascend_table())):
        yield True


def as_bf16_model(net, emulate: bool):
    """On a CPU: parameters and layer outputs rounded to bf16 (the emulation); on an NPU: unchanged."""
    if emulate:
        standins.round_parameters(net)
        standins.round_layer_outputs(net)
    return net


def error(port, ref) -> float:
    return parity_error(port.astype(ms.float32) if isinstance(port, Tensor) else port, ref)


def rounded_kwargs(inputs, case):
    """The case's inputs in bf16, except the timestep: the original's bf16 run kept it in float32 (its
    adaln_timestep is 0.4% from the fp32 run; rounding 0.7 to bf16 alone moves it by 16%)."""
    kw = call_kwargs(inputs, case)
    return {k: v if k == "timestep" else standins.round_bf16(v) for k, v in kw.items()}


def test_dit_bf16_against_original_bf16_and_fp32(bf16_mode, tmp_path):
    model = as_bf16_model(StepVideoModel.from_pretrained(transformer_folder(tmp_path / "transformer")), bf16_mode)
    inputs, fp32, bf16 = load("dit", "inputs"), load("dit", "outputs"), load("dit_bf16", "outputs")
    worst_bf16 = worst_fp32 = 0.0
    for case in DIT_CASES:
        got = dit_intermediates(model, rounded_kwargs(inputs, case))
        for name in DIT_TENSORS:
            key = f"{case}.{name}"
            e_bf16, e_fp32 = error(got[name], bf16[key]), error(got[name], fp32[key])
            original = parity_error(bf16[key], fp32[key])
            print(f"bf16 DiT {key}: vs original bf16 {e_bf16:.2e}, vs fp32 {e_fp32:.2e} "
                  f"(original bf16 vs fp32 {original:.2e})")
            worst_bf16, worst_fp32 = max(worst_bf16, e_bf16), max(worst_fp32, e_fp32)
    assert worst_bf16 <= BF16_DIT_VS_ORIGINAL_BF16
    assert worst_fp32 <= BF16_DIT_VS_FP32


def test_step_llm_bf16_against_fp32(bf16_mode, tmp_path):
    from test_step_llm import model_folder

    encoder = STEP1TextEncoder(model_folder(tmp_path / "step_llm", "single"))
    as_bf16_model(encoder.text_encoder, bf16_mode)
    outputs = load("step_llm", "outputs")
    worst = 0.0
    for batch, prompts in sorted(cases("step_llm")["encoder_batches"].items()):
        y, _ = encoder(prompts)
        err = error(y, outputs[f"{batch}.y"])
        print(f"bf16 Step-LLM {batch}.y vs fp32: {err:.2e}")
        worst = max(worst, err)
    assert worst <= BF16_STEP_LLM_VS_FP32


def test_vae_mid_attention_bf16_against_fp32(bf16_mode):
    """FlashAttentionScore (through its stand-in) with D = 512 and the causal mask, bf16 activations."""
    outputs = load("vae", "outputs")
    worst = 0.0
    for case, side in (("d0", "decoder"), ("e0", "encoder")):
        block = as_bf16_model(vae_mid_attention(side), bf16_mode)
        x = standins.round_bf16(Tensor(outputs[f"{case}.mid_block_1_out"]))
        err = error(block(x.astype(block.q.conv.weight.dtype)), outputs[f"{case}.mid_attn_1_out"])
        print(f"bf16 VAE {case}.mid_attn_1_out vs fp32: {err:.2e}")
        worst = max(worst, err)
    assert worst <= BF16_VAE_ATTENTION_VS_FP32
