"""Write a complete tiny Step-Video-T2V model folder in the real layout, with random weights.

    python scripts/make_tiny_checkpoint.py checkpoints/tiny [--seed 0] [--layers 3]

Layout (as the published stepfun-ai/stepvideo-t2v, every file small):

    model_index.json
    transformer/      config.json, diffusion_pytorch_model-0000k-of-0000n.safetensors (bf16) + index
    scheduler/        scheduler_config.json (reverse: false, as the published one)
    step_llm/         config.json, model-0000k-of-0000n.safetensors (bf16) + index, step1_chat_tokenizer.model
    hunyuan_clip/     clip_text_encoder/{config.json, pytorch_model.bin}  (a real PyTorch zip checkpoint,
                      written without torch, with the extra CLIP keys that convert.py drops)
                      tokenizer/{vocab.txt, tokenizer_config.json, special_tokens_map.json}
    vae/              vae_v2.safetensors (bf16) + config.json with the tiny widths

The DiT has 6 heads of 128 channels, so Ulysses degrees 1, 2, 3 (and 6) work, and 2 blocks (2
pipeline stages; --layers gives more). That fixes its size: 24M parameters, 48 MB in bf16, most of
the folder's ~48 MiB. Weights follow the
golden fixtures' generation rule (per-key seed from the salt and the key), so the folder is the same
bit for bit for the same seed. The model configurations are configs/tiny/*.json. The sentencepiece tokenizer is trained here on a small built-in
corpus (deterministic with one thread); the BERT vocabulary is built from the same corpus.
Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convert import bert_expected_shapes  # noqa: E402  (repo-root script, shared key table)
from stepvideo import backend  # noqa: E402
from stepvideo.checkpoint import named_parameters, save_sharded  # noqa: E402
from stepvideo.utils import safetensors_io as st  # noqa: E402
from synthetic_weights import rule_weights  # noqa: E402
from torch_checkpoint_writer import save_state_dict  # noqa: E402

CONFIGS = ROOT / "configs" / "tiny"
CONTROL_TOKENS = ["<|BOT|>", "<|EOT|>", "<|CALL_START|>", "<|CALL_END|>", "<|THINK_START|>", "<|THINK_END|>"]
MASK_TOKENS = ["<|MASK_1e69f|>", "<|UNMASK_1e69f|>"]
SHARD_BYTES = 16 * 2**20

# A small bilingual corpus: the magic prompts of the original, and a few typical prompts.
CORPUS = [
    "超高清、HDR 视频、环境光、杜比全景声、画面稳定、流畅动作、逼真的细节、专业级构图、超现实主义、自然、生动、超细节、清晰。",
    "画面暗、低分辨率、不良手、文本、缺少手指、多余的手指、裁剪、低质量、颗粒状、签名、水印、用户名、模糊。",
    "A cat walks on the grass, realistic style.",
    "An astronaut rides a horse on the moon, cinematic lighting, 4K, HDR.",
    "一名宇航员在月球上发现一块石碑，上面印有“stepfun”字样，闪闪发光。",
    "A golden retriever drives through a spaceship, anime style, close-up shot.",
    "一只熊猫在日落时的沙漠里飞翔，慢动作，柔和的晨光。",
    "The waves crash against the rocks at sunset; seagulls fly over the sea.",
    "A red car drives through a quiet library at night, neon lights, shallow depth of field.",
    "一个机器人在竹林中行走，胶片颗粒感，纪录片风格。",
]


def read_tiny_config(name: str) -> dict:
    """configs/tiny/<name>.json: a tiny model's configuration, as written into the checkpoint folder."""
    return json.loads((CONFIGS / f"{name}.json").read_text())


def dit_config(layers: int) -> dict:
    """The tiny DiT with `layers` blocks; its caption channels must be the two text encoders' widths."""
    config = dict(read_tiny_config("transformer"), num_layers=layers)
    widths = [STEP_LLM_CONFIG["hidden_size"], CLIP_HIDDEN]
    if config["caption_channels"] != widths:
        raise ValueError(f"{CONFIGS}/transformer.json: caption_channels {config['caption_channels']} must be "
                         f"[step_llm hidden_size, clip hidden_size] = {widths}")
    return config


STEP_LLM_CONFIG = read_tiny_config("step_llm")
CLIP_CONFIG = read_tiny_config("clip_text_encoder")  # vocab_size is set from the vocabulary built below
CLIP_HIDDEN = CLIP_CONFIG["hidden_size"]


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def lazy_shapes(net) -> dict:
    return {k: tuple(p.shape) for k, p in named_parameters(net).items()}


def write_transformer(out: Path, layers: int, seed: int) -> None:
    from stepvideo.modules.model import StepVideoModel

    config = dit_config(layers)
    shapes = lazy_shapes(StepVideoModel.from_config_dict(config))  # builds lazily: no weight memory
    write_json(out / "transformer" / "config.json", config)
    save_sharded(rule_weights(shapes, salt=f"tiny-dit-{seed}:"), out / "transformer",
                 "diffusion_pytorch_model", SHARD_BYTES, bf16=True)


def train_tokenizer(vocab_size: int) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 8), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity", num_threads=1,
        control_symbols=CONTROL_TOKENS, user_defined_symbols=MASK_TOKENS, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2)
    return model.getvalue()


def write_step_llm(out: Path, seed: int) -> None:
    from stepvideo.text_encoder.stepllm import Step1Model

    folder = out / "step_llm"
    write_json(folder / "config.json", STEP_LLM_CONFIG)
    (folder / "step1_chat_tokenizer.model").write_bytes(train_tokenizer(STEP_LLM_CONFIG["orig_vocab_size"]))
    shapes = lazy_shapes(Step1Model.from_config_dict(STEP_LLM_CONFIG))
    save_sharded(rule_weights(shapes, salt=f"tiny-step_llm-{seed}:"), folder, "model", 96 * 2**10, bf16=True)


def bert_vocab() -> list:
    chars = sorted({ch.lower() for text in CORPUS for ch in text if not ch.isspace()})
    words = sorted({w.strip(".,;:!?“”\"'").lower() for text in CORPUS for w in text.split() if w.isascii()})
    return ["[PAD]"] + [f"[unused{i}]" for i in range(4)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + \
        [w for w in words if w and w not in chars] + chars


def write_hunyuan_clip(out: Path, seed: int) -> None:
    folder = out / "hunyuan_clip"
    vocab = bert_vocab()
    tok = folder / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    (tok / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    write_json(tok / "special_tokens_map.json", {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]",
                                                 "sep_token": "[SEP]", "unk_token": "[UNK]"})
    write_json(tok / "tokenizer_config.json", {"do_lower_case": True, "tokenize_chinese_chars": True,
                                               "strip_accents": None, "model_max_length": 77,
                                               "tokenizer_class": "BertTokenizer"})
    config = dict(CLIP_CONFIG, vocab_size=len(vocab))
    enc = folder / "clip_text_encoder"
    write_json(enc / "config.json", config)
    shapes = dict(bert_expected_shapes(config))
    # The published file holds a whole CLIP; convert.py keeps only the BERT text tower.
    shapes.update({"logit_scale": (), "text_projection": (CLIP_HIDDEN, 16), "visual.conv1.weight": (16, 3, 4, 4)})
    tensors = rule_weights({k: v for k, v in shapes.items() if v != ()}, salt=f"tiny-clip-{seed}:")
    tensors["logit_scale"] = np.array(4.6052, np.float32)
    save_state_dict(enc / "pytorch_model.bin", tensors)


def write_vae(out: Path, seed: int) -> None:
    from stepvideo.vae.vae import AutoencoderKL, VaeConfig

    # The smallest widths the v2 structure allows with z = 64 (the patch layer must be a multiple of 2z).
    config = VaeConfig.from_dict(read_tiny_config("vae"))
    folder = out / "vae"
    write_json(folder / "config.json", config.to_dict())
    net = AutoencoderKL(z_channels=64, version=2, config=config)
    tensors = rule_weights(lazy_shapes(net), salt=f"tiny-vae-{seed}:")
    # The published file names the decoder's last conv `decoder.conv_out.*` (loaded into `.conv.*`).
    tensors = {k.replace("decoder.conv_out.conv.", "decoder.conv_out."): v for k, v in tensors.items()}
    st.save_file(folder / "vae_v2.safetensors", tensors, bf16=tensors.keys())


def make_tiny_checkpoint(out: Path, seed: int = 0, layers: int = 2) -> Path:
    backend.init("cpu")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    write_json(tmp / "model_index.json", {"_class_name": "StepVideoPipeline", "_diffusers_version": "0.31.0",
                                          "scheduler": ["stepvideo", "FlowMatchDiscreteScheduler"],
                                          "transformer": ["stepvideo", "StepVideoModel"]})
    write_json(tmp / "scheduler" / "scheduler_config.json",
               {"_class_name": "FlowMatchDiscreteScheduler", "_diffusers_version": "0.31.0.dev0", "device": None,
                "num_train_timesteps": 1000, "reverse": False, "solver": "euler"})
    write_transformer(tmp, layers, seed)
    write_step_llm(tmp, seed)
    write_hunyuan_clip(tmp, seed)
    write_vae(tmp, seed)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # the folder appears complete or not at all
    return out


def convert_clip(model_dir: Path) -> None:
    """The README's conversion step: hunyuan_clip/clip_text_encoder/pytorch_model.bin -> model.safetensors."""
    from convert import convert

    enc = model_dir / "hunyuan_clip" / "clip_text_encoder"
    convert(str(enc / "pytorch_model.bin"), str(enc / "model.safetensors"), str(enc / "config.json"))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to create (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2, help="DiT blocks (2: enough for 2 pipeline stages)")
    parser.add_argument("--convert", action="store_true",
                        help="also run convert.py on the CLIP pytorch_model.bin (the demo does this as its own step)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = make_tiny_checkpoint(args.out, args.seed, args.layers)
    if args.convert:
        convert_clip(out)
    print(f"wrote {out} ({folder_bytes(out) / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
