"""Sampling text from a trained GPT: from a live model or from a checkpoint folder."""

from __future__ import annotations

from pathlib import Path

import torch

from minillm import checkpoint, infer
from minillm.engines.common import rebuild_model
from minillm.errors import InputError, require_text
from minillm.generate import generate
from minillm.model import GPT
from minillm.tokenizer import Tokenizer
from minillm.tokenizer import load as load_tokenizer


def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> str:
    """`prompt` followed by `max_new_tokens` generated tokens, decoded: `minillm.generate` on
    text. The same seed gives the same text; temperature 0 is greedy decoding. A prompt longer
    than the model's context is refused rather than silently cut."""
    require_text(prompt, "prompt")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise InputError("the prompt is empty; give at least one character (e.g. a newline)")
    block = model.config.block_size
    if len(ids) > block:
        raise InputError(
            f"the prompt is {len(ids)} tokens, longer than the model's context of {block}; "
            f"shorten it to at most {block} tokens"
        )
    device = next(model.parameters()).device
    out = generate(
        model,
        torch.tensor([ids], device=device),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )
    return tokenizer.decode(out[0].tolist())


def load_for_sampling(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer of a checkpoint folder, or of a run folder's latest checkpoint."""
    folder = checkpoint.resolve(Path(path))
    if (folder / infer.COMPRESSION).is_file():  # `minillm compress` wrote it: quantised weights
        model, tokenizer = infer.load_compressed(folder, device)
        if tokenizer is None:
            raise checkpoint.CheckpointError(
                f"{folder} has no {checkpoint.TOKENIZER}; it cannot decode samples"
            )
        return model, tokenizer
    config = checkpoint.load_config(folder)
    model = rebuild_model(config, folder, device)
    tokenizer_file = folder / checkpoint.TOKENIZER
    if not tokenizer_file.is_file():
        raise checkpoint.CheckpointError(
            f"{folder} has no {checkpoint.TOKENIZER}; it cannot decode samples"
        )
    return model, load_tokenizer(tokenizer_file)
