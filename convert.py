"""Convert HunyuanCLIP's `pytorch_model.bin` to the `model.safetensors` our BERT loads.

The published `hunyuan_clip/clip_text_encoder/pytorch_model.bin` is a torch pickle
holding a whole CLIP: the BERT text tower plus keys `BertModel` ignores
(`visual.*`, `logit_scale`, `text_projection`, ...). This keeps exactly the
tensors of a `BertModel` with pooler, as implied by `config.json` (a `bert.`
prefix is stripped), checks each one's shape, and writes them with their dtypes
preserved (or cast with --dtype). The .bin is read with a restricted unpickler
(`stepvideo.utils.torch_format`): no code in it is ever executed, and torch is
not needed.

    python convert.py --pt_filename .../pytorch_model.bin \\
        --sf_filename .../model.safetensors --config_path .../config.json [--dtype bfloat16]

The output is written atomically (temporary file, then rename): after any error
there is no output file. Errors are one line on stderr, exit code 1.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from stepvideo import dtypes
from stepvideo.utils import safetensors_io as st
from stepvideo.utils.torch_format import TorchCheckpoint, TorchFormatError

BERT_PREFIX = "bert."
FLOAT_DTYPES = dtypes.FLOAT_NAMES


class ConvertError(ValueError):
    """The checkpoint or config cannot be turned into a BertModel safetensors file."""


@dataclass
class Summary:
    source_format: str
    kept: Dict[str, str]  # output name -> output dtype
    stripped_prefix: int  # how many kept keys lost a "bert." prefix
    dropped: List[str]
    source_dtypes: Dict[str, int]
    tensor_bytes: int
    output_bytes: int


def bert_expected_shapes(config: dict) -> Dict[str, Tuple[int, ...]]:
    """Every parameter of transformers' `BertModel` (with pooler) and its shape, from config.json."""
    fields = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
              "max_position_embeddings", "type_vocab_size")
    missing = [f for f in fields if not isinstance(config.get(f), int)]
    if missing:
        raise ConvertError(f"config.json lacks integer field(s) {missing} needed for the BERT key table")
    if config.get("model_type", "bert") != "bert":
        raise ConvertError(f"config.json model_type is {config['model_type']!r}, expected 'bert'")
    h, inter = config["hidden_size"], config["intermediate_size"]
    shapes: Dict[str, Tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (config["vocab_size"], h),
        "embeddings.position_embeddings.weight": (config["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": (config["type_vocab_size"], h),
    }

    def affine(name: str, out: int, fan_in: Optional[int] = None) -> None:
        """`name.weight` (out, fan_in) or (out,) for a norm, and `name.bias` (out,)."""
        shapes[f"{name}.weight"] = (out,) if fan_in is None else (out, fan_in)
        shapes[f"{name}.bias"] = (out,)

    affine("embeddings.LayerNorm", h)
    for i in range(config["num_hidden_layers"]):
        layer = f"encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            affine(f"{layer}.attention.self.{proj}", h, h)
        affine(f"{layer}.attention.output.dense", h, h)
        affine(f"{layer}.attention.output.LayerNorm", h)
        affine(f"{layer}.intermediate.dense", inter, h)
        affine(f"{layer}.output.dense", h, inter)
        affine(f"{layer}.output.LayerNorm", h)
    affine("pooler.dense", h, h)
    return shapes


def select_bert_keys(names: Sequence[str], expected: Dict[str, Tuple[int, ...]]):
    """Split checkpoint names into (BERT name -> checkpoint name) and the dropped names."""
    kept: Dict[str, str] = {}
    dropped: List[str] = []
    for name in names:
        bert_name = name[len(BERT_PREFIX):] if name.startswith(BERT_PREFIX) else name
        if bert_name not in expected:
            dropped.append(name)
        elif bert_name in kept:
            raise ConvertError(f"tensor {bert_name!r} appears both as {kept[bert_name]!r} and as {name!r}")
        else:
            kept[bert_name] = name
    return kept, dropped


def cast(arr: np.ndarray, source: str, target: str) -> np.ndarray:
    """Cast between float dtypes as torch's `.to()` does (bfloat16 as uint16 bits, round to nearest even)."""
    if source == target:
        return arr
    wide = dtypes.bf16_bits_to_f32(arr) if source == "bfloat16" else arr.astype(np.float32)
    if target == "bfloat16":
        return dtypes.f32_to_bf16_bits(wide)
    return wide.astype(dtypes.BY_NAME[target].numpy)


def convert(pt_filename: str, sf_filename: str, config_path: str, dtype: Optional[str] = None) -> Summary:
    try:
        with open(config_path, "r", encoding="utf-8") as fh:
            config = json.load(fh)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{config_path}: expected a JSON object")
    expected = bert_expected_shapes(config)
    out_dir = os.path.dirname(os.path.abspath(sf_filename))
    if not os.path.isdir(out_dir):
        raise ConvertError(f"output directory {out_dir} does not exist")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ConvertError(f"--dtype {dtype!r} is not one of {FLOAT_DTYPES}")

    with TorchCheckpoint(pt_filename) as ckpt:
        kept, dropped = select_bert_keys(list(ckpt.keys()), expected)
        missing = [k for k in expected if k not in kept]
        if missing:
            raise ConvertError(f"{pt_filename}: missing BERT tensor(s) {', '.join(missing)}")
        for bert_name, name in kept.items():
            ref = ckpt.tensors[name]
            if ref.shape != expected[bert_name]:
                raise ConvertError(f"{pt_filename}: tensor {name!r} has shape {ref.shape}, expected "
                                   f"{expected[bert_name]} from {os.path.basename(config_path)}")
            if ref.dtype not in FLOAT_DTYPES:
                raise ConvertError(f"{pt_filename}: tensor {name!r} has dtype {ref.dtype}, expected one of "
                                   f"{FLOAT_DTYPES}")
        tensors: Dict[str, np.ndarray] = {}
        out_dtypes: Dict[str, str] = {}
        for bert_name, name in kept.items():
            source = ckpt.tensors[name].dtype
            out_dtypes[bert_name] = dtype or source
            tensors[bert_name] = cast(ckpt.read(name), source, out_dtypes[bert_name])
        source_dtypes = collections.Counter(ckpt.tensors[name].dtype for name in kept.values())

    bf16 = [n for n, d in out_dtypes.items() if d == "bfloat16"]
    st.save_file(sf_filename, tensors, bf16=bf16, metadata={"format": "pt"})
    return Summary(
        source_format=ckpt.format, kept=out_dtypes,
        stripped_prefix=sum(1 for b, n in kept.items() if b != n), dropped=dropped,
        source_dtypes=dict(sorted(source_dtypes.items())),
        tensor_bytes=sum(a.nbytes for a in tensors.values()), output_bytes=os.path.getsize(sf_filename))


def _format_summary(summary: Summary, args: argparse.Namespace) -> str:
    out_dtypes = collections.Counter(summary.kept.values())
    lines = [
        f"read {args.pt_filename} ({summary.source_format} format)",
        f"kept {len(summary.kept)} BertModel tensors"
        + (f" ('{BERT_PREFIX}' prefix stripped from {summary.stripped_prefix})" if summary.stripped_prefix else ""),
        f"dropped {len(summary.dropped)} keys: {', '.join(summary.dropped) or '-'}",
        "dtypes in: " + ", ".join(f"{d} x{n}" for d, n in summary.source_dtypes.items())
        + "; out: " + ", ".join(f"{d} x{n}" for d, n in sorted(out_dtypes.items())),
        f"wrote {args.sf_filename}: {summary.output_bytes} bytes ({summary.tensor_bytes} bytes of tensor data)",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pt_filename", required=True, help="the CLIP pytorch_model.bin")
    parser.add_argument("--sf_filename", required=True, help="the model.safetensors to write")
    parser.add_argument("--config_path", required=True, help="the BERT config.json next to the .bin")
    parser.add_argument("--dtype", choices=FLOAT_DTYPES, default=None,
                        help="cast all tensors to this dtype (default: keep each tensor's dtype)")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.pt_filename, args.sf_filename, args.config_path, args.dtype)
    except (ConvertError, TorchFormatError, st.SafetensorsError, OSError) as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        return 1
    print(_format_summary(summary, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
