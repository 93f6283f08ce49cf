"""Greedy generation with onnxruntime from the two files `export_onnx(..., decode=True)` writes.

The layout (optimum / onnxruntime-genai style, with the layers' keys and values stacked):

- `<stem>.onnx`, the prefill: `input_ids` int64 [batch, seq] -> `logits` float [batch, seq, vocab],
  `present_keys` and `present_values` [n_layer, batch, n_kv_head, seq, head_dim];
- `<stem>.decode.onnx`, a decode step: `input_ids` [batch, seq] (the new tokens), `past_keys` and
  `past_values` [n_layer, batch, n_kv_head, past, head_dim] -> `logits` [batch, seq, vocab] and the
  present keys/values [n_layer, batch, n_kv_head, past + seq, head_dim]: the past with the new
  tokens' keys/values appended. The new tokens sit at positions past .. past + seq - 1, so no
  position input is needed (every row of a batch has the same length).

Invariant: `onnx_generate` feeds back every token but the last, exactly as `snlp_compile.generate`
does, so with files that compute the sequential model (iters >= the block size) it returns the
sequential model's greedy tokens (up to float rounding of near ties).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import check_int

INPUT_IDS = "input_ids"
LOGITS = "logits"
PAST = ("past_keys", "past_values")
PRESENT = ("present_keys", "present_values")
MAX_SEQ_LEN = "snlp_compile.max_seq_len"  # metadata of both files: the model's context
VOCAB_SIZE = "snlp_compile.vocab_size"


def decode_path(path: str | Path) -> Path:
    """The decode-step file written beside the prefill file `path`: `<stem>.decode.onnx`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.decode.onnx")


def _prompt(prompt_ids: Any, max_new_tokens: int, limits: dict[str, str]) -> np.ndarray:
    """The prompt as int64 [B, T], once every argument is known to be valid (ValueError naming it)."""
    check_int("max_new_tokens", max_new_tokens, 1)
    prompt = np.asarray(prompt_ids)
    if prompt.dtype.kind not in "iu" or prompt.ndim not in (1, 2) or 0 in prompt.shape:
        raise ValueError(
            f"prompt_ids must be a non-empty integer array [T] or [B, T], got {prompt.dtype} {prompt.shape}"
        )
    prompt = prompt.astype(np.int64).reshape(-1, prompt.shape[-1])
    if VOCAB_SIZE in limits and not 0 <= prompt.min() <= prompt.max() < int(limits[VOCAB_SIZE]):
        raise ValueError(f"prompt_ids must be token ids in [0, vocab_size={limits[VOCAB_SIZE]})")
    if MAX_SEQ_LEN in limits and prompt.shape[1] + max_new_tokens > int(limits[MAX_SEQ_LEN]):
        raise ValueError(
            f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} exceeds the model's context "
            f"max_seq_len={limits[MAX_SEQ_LEN]}"
        )
    return prompt


def onnx_generate(
    path: str | Path,
    prompt_ids: Any,
    max_new_tokens: int,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    session_options: Any = None,
) -> np.ndarray:
    """The `max_new_tokens` greedy tokens after `prompt_ids` (int [T] or [B, T]), int64 [B, max_new_tokens],
    run by onnxruntime from the prefill file `path` and its decode-step file (`decode_path(path)`).

    providers / session_options: passed to both `onnxruntime.InferenceSession`s.
    """
    import onnxruntime

    path = Path(path)
    step_path = decode_path(path)
    for file in (path, step_path):
        if not file.exists():
            raise FileNotFoundError(f"{file} does not exist: write both files with export_onnx(..., decode=True)")
    prefill = onnxruntime.InferenceSession(str(path), session_options, providers=list(providers))
    step = onnxruntime.InferenceSession(str(step_path), session_options, providers=list(providers))
    prompt = _prompt(prompt_ids, max_new_tokens, prefill.get_modelmeta().custom_metadata_map)
    logits, keys, values = prefill.run([LOGITS, *PRESENT], {INPUT_IDS: prompt})
    tokens = [logits[:, -1].argmax(-1)]
    for _ in range(max_new_tokens - 1):
        feed = {INPUT_IDS: tokens[-1][:, None], PAST[0]: keys, PAST[1]: values}
        logits, keys, values = step.run([LOGITS, *PRESENT], feed)
        tokens.append(logits[:, -1].argmax(-1))
    return np.stack(tokens, axis=1).astype(np.int64)
