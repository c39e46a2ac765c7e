"""The Step-1 chat tokenizer (sentencepiece) and the fixed-length wrapper Step-LLM is fed with.

    tok = Wrapped_StepChatTokenizer("step_llm/step1_chat_tokenizer.model")
    t = tok(["a cat", ""], max_length=320)
    t.input_ids        # (b, 320) int64: [BOS] + pieces[:318] + [EOS], right-padded with PAD
    t.attention_mask   # (b, 320) int64: 1 on the valid (non-pad) positions
    t.cu_seqlens       # (b + 1,) int32: cumsum([0] + valid lengths)

Contract (checked by the golden fixtures):
- BOS = 1, EOS = 2 and PAD = 2 are fixed numbers, not read from the model file.
- Always truncates to max_length - 2 pieces and always pads to max_length.
- "" gives [BOS, EOS, PAD, ...]; an empty list of prompts gives one such row.
- The model file must define the chat control tokens (<|BOT|>, <|EOT|>, ...) as
  control symbols and the mask tokens at all.
- Results are numpy arrays; a bare string is one prompt; bad input raises
  TypeError/ValueError naming what is wrong.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Union

import numpy as np

from stepvideo.contracts import check_prompts

CONTROL_TOKENS = ("<|BOT|>", "<|EOT|>", "<|CALL_START|>", "<|CALL_END|>", "<|THINK_START|>", "<|THINK_END|>")
MASK_TOKENS = ("<|MASK_1e69f|>", "<|UNMASK_1e69f|>")


class TokenizerError(ValueError):
    """A tokenizer model file lacks a token the Step-1 chat format needs."""


class StepChatTokenizer:
    """sentencepiece with the Step-1 chat vocabulary checks."""

    def __init__(
        self, model_file, name="StepChatTokenizer",
        bot_token="<|BOT|>",  # begin of turn
        eot_token="<|EOT|>",  # end of turn
        call_start_token="<|CALL_START|>",
        call_end_token="<|CALL_END|>",
        think_start_token="<|THINK_START|>",
        think_end_token="<|THINK_END|>",
        mask_start_token="<|MASK_1e69f|>",
        mask_end_token="<|UNMASK_1e69f|>",
    ):
        import sentencepiece

        model_file = os.fspath(model_file)
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"sentencepiece model {model_file} not found (expected "
                                    f"step1_chat_tokenizer.model in the step_llm folder)")
        self.name = name
        self._tokenizer = sentencepiece.SentencePieceProcessor(model_file=model_file)
        sp = self._tokenizer

        self._vocab: Dict[str, int] = {}
        self._inv_vocab: Dict[int, str] = {}
        self._special_tokens: Dict[str, int] = {}
        for idx in range(sp.get_piece_size()):
            piece = sp.id_to_piece(idx)
            self._vocab[piece] = idx
            self._inv_vocab[idx] = piece
            if sp.is_control(idx) or sp.is_unknown(idx):
                self._special_tokens[piece] = idx

        self._unk_id = sp.unk_id()
        self._bos_id = sp.bos_id()
        self._eos_id = sp.eos_id()

        for token in (bot_token, eot_token, call_start_token, call_end_token, think_start_token, think_end_token):
            if token not in self._vocab:
                raise TokenizerError(f"{model_file}: token {token!r} not found; the Step-1 chat tokenizer "
                                     f"defines it as a control token")
            if token not in self._special_tokens:
                raise TokenizerError(f"{model_file}: token {token!r} is an ordinary piece; expected a "
                                     f"control token")
        for token in (mask_start_token, mask_end_token):
            if token not in self._vocab:
                raise TokenizerError(f"{model_file}: token {token!r} not found in the vocabulary")

        self._bot_id = sp.piece_to_id(bot_token)
        self._eot_id = sp.piece_to_id(eot_token)
        self._call_start_id = sp.piece_to_id(call_start_token)
        self._call_end_id = sp.piece_to_id(call_end_token)
        self._think_start_id = sp.piece_to_id(think_start_token)
        self._think_end_id = sp.piece_to_id(think_end_token)
        self._mask_start_id = sp.piece_to_id(mask_start_token)
        self._mask_end_id = sp.piece_to_id(mask_end_token)
        self._underline_id = sp.piece_to_id("\u2581")

    @property
    def vocab(self) -> Dict[str, int]:
        return self._vocab

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return self._inv_vocab

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.vocab_size()

    def tokenize(self, text: str) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
        return self._tokenizer.encode_as_ids(text)

    def detokenize(self, token_ids: List[int]) -> str:
        return self._tokenizer.decode_ids(list(token_ids))


@dataclass
class Tokens:
    """A batch of fixed-length token rows (numpy)."""

    input_ids: np.ndarray  # (b, max_length) int64
    cu_input_ids: np.ndarray  # (1, sum of valid lengths) int64: the valid tokens of all rows, concatenated
    attention_mask: np.ndarray  # (b, max_length) int64, 1 = valid
    cu_seqlens: np.ndarray  # (b + 1,) int32
    max_seq_len: int  # longest valid length


class Wrapped_StepChatTokenizer(StepChatTokenizer):
    """Prompts -> `Tokens` of [BOS] + pieces + [EOS], right-padded to max_length."""

    BOS = 1
    EOS = 2
    PAD = 2

    def __call__(self, text: Union[str, Sequence[str]], max_length: int = 320, padding: str = "max_length",
                 truncation: bool = True) -> Tokens:
        # The original always pads to max_length and always truncates; other values would be ignored
        # there, so they are refused here rather than silently meaning the same thing.
        if padding != "max_length":
            raise ValueError(f"padding={padding!r}: only 'max_length' is supported (as in the original)")
        if truncation is not True:
            raise ValueError(f"truncation={truncation!r}: only True is supported (as in the original)")
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for BOS and EOS), got {max_length!r}")
        empty_batch = isinstance(text, (list, tuple)) and not text
        prompts = [""] if empty_batch else check_prompts(text)  # an empty batch encodes like one empty prompt

        ids = np.full((len(prompts), max_length), self.PAD, dtype=np.int64)
        mask = np.zeros((len(prompts), max_length), dtype=np.int64)
        lengths = []
        for row, prompt in enumerate(prompts):
            pieces = [self.BOS] + self.tokenize(prompt)[:max_length - 2] + [self.EOS]
            ids[row, :len(pieces)] = pieces
            mask[row, :len(pieces)] = 1
            lengths.append(len(pieces))

        cu_seqlens = np.cumsum([0] + lengths).astype(np.int32)
        return Tokens(input_ids=ids, cu_input_ids=ids[mask != 0][None], attention_mask=mask,
                      cu_seqlens=cu_seqlens, max_seq_len=max(lengths))
