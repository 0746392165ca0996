"""The course GPT and Hugging Face `transformers`' GPT-2, converted into each other.

`minillm.model.GPT` with learned positions has GPT-2's architecture, so its weights fit
`transformers.GPT2LMHeadModel` exactly; only the layout differs:

| minillm                              | GPT-2 (under `transformer.` except `lm_head`)  |
|--------------------------------------|------------------------------------------------|
| `tok_emb`, `pos_emb`                 | `wte`, `wpe`                                   |
| `blocks[i].self_attn.{q,k,v}_proj`   | `h[i].attn.c_attn`: one matrix, q k v in a row |
| `blocks[i].self_attn.o_proj`         | `h[i].attn.c_proj`                             |
| `blocks[i].mlp.up_proj`, `down_proj` | `h[i].mlp.c_fc`, `c_proj`                      |
| `ln_1`, `ln_2`, `ln_f`, `lm_head`    | the same names                                 |

GPT-2's layers are `Conv1D` modules, which store a linear layer's weight transposed: `(in, out)`
where `nn.Linear` stores `(out, in)`.

`to_hf`/`from_hf` convert models in memory; `save_pretrained` writes a folder that
`AutoModelForCausalLM.from_pretrained` loads; `load_gpt2` reads a GPT-2 checkpoint (a folder, or a
Hub name such as "gpt2" where there is internet) into the course GPT.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from minillm.errors import InputError, InputTypeError
from minillm.model import GPT, GPTConfig

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel, PreTrainedModel

# GPT-2's activation names for the tanh-approximated GELU that minillm's MLP uses.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which minillm's layers use


def _gpt_to_hf_state(state: dict[str, Tensor], n_layer: int) -> dict[str, Tensor]:
    """minillm GPT state dict -> GPT2LMHeadModel state dict (missing biases become zeros)."""

    def b(name: str, size: int) -> Tensor:
        return state[name] if name in state else state["ln_f.weight"].new_zeros(size)

    out = {
        "transformer.wte.weight": state["tok_emb.weight"],
        "transformer.wpe.weight": state["pos_emb.weight"],
        "transformer.ln_f.weight": state["ln_f.weight"],
        "transformer.ln_f.bias": b("ln_f.bias", state["ln_f.weight"].numel()),
        "lm_head.weight": state["lm_head.weight"],
    }
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        n_embd = state[ours + "ln_1.weight"].numel()
        qkv = [ours + f"self_attn.{x}_proj" for x in "qkv"]
        out |= {
            theirs + "ln_1.weight": state[ours + "ln_1.weight"],
            theirs + "ln_1.bias": b(ours + "ln_1.bias", n_embd),
            # Conv1D computes x @ W + b with W (in, out): our (out, in) matrices, transposed.
            theirs + "attn.c_attn.weight": torch.cat([state[p + ".weight"] for p in qkv]).T,
            theirs + "attn.c_attn.bias": torch.cat([b(p + ".bias", n_embd) for p in qkv]),
            theirs + "attn.c_proj.weight": state[ours + "self_attn.o_proj.weight"].T,
            theirs + "attn.c_proj.bias": b(ours + "self_attn.o_proj.bias", n_embd),
            theirs + "ln_2.weight": state[ours + "ln_2.weight"],
            theirs + "ln_2.bias": b(ours + "ln_2.bias", n_embd),
            theirs + "mlp.c_fc.weight": state[ours + "mlp.up_proj.weight"].T,
            theirs + "mlp.c_fc.bias": b(ours + "mlp.up_proj.bias", 4 * n_embd),
            theirs + "mlp.c_proj.weight": state[ours + "mlp.down_proj.weight"].T,
            theirs + "mlp.c_proj.bias": b(ours + "mlp.down_proj.bias", n_embd),
        }
    return out


def _hf_to_gpt_state(state: dict[str, Tensor], n_layer: int) -> dict[str, Tensor]:
    """GPT2LMHeadModel state dict -> minillm GPT state dict (GPT-2 always has biases)."""
    out = {
        "tok_emb.weight": state["transformer.wte.weight"],
        "pos_emb.weight": state["transformer.wpe.weight"],
        "ln_f.weight": state["transformer.ln_f.weight"],
        "ln_f.bias": state["transformer.ln_f.bias"],
        "lm_head.weight": state["lm_head.weight"],
    }
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        q_w, k_w, v_w = state[theirs + "attn.c_attn.weight"].T.chunk(3)
        q_b, k_b, v_b = state[theirs + "attn.c_attn.bias"].chunk(3)
        for name, w, bias in (("q", q_w, q_b), ("k", k_w, k_b), ("v", v_w, v_b)):
            out[ours + f"self_attn.{name}_proj.weight"] = w
            out[ours + f"self_attn.{name}_proj.bias"] = bias
        out |= {
            ours + "self_attn.o_proj.weight": state[theirs + "attn.c_proj.weight"].T,
            ours + "self_attn.o_proj.bias": state[theirs + "attn.c_proj.bias"],
            ours + "mlp.up_proj.weight": state[theirs + "mlp.c_fc.weight"].T,
            ours + "mlp.up_proj.bias": state[theirs + "mlp.c_fc.bias"],
            ours + "mlp.down_proj.weight": state[theirs + "mlp.c_proj.weight"].T,
            ours + "mlp.down_proj.bias": state[theirs + "mlp.c_proj.bias"],
        }
        for norm in ("ln_1", "ln_2"):
            out[ours + f"{norm}.weight"] = state[theirs + f"{norm}.weight"]
            out[ours + f"{norm}.bias"] = state[theirs + f"{norm}.bias"]
    return out


def to_hf(gpt: GPT) -> GPT2LMHeadModel:
    """A `transformers.GPT2LMHeadModel` holding a copy of `gpt`'s weights, on its device and dtype,
    in the same train/eval mode. Needs learned positions (GPT-2 has no rotary embeddings); a model
    without biases maps with zero biases, which compute the same thing."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if not isinstance(gpt, GPT):
        raise InputTypeError(f"to_hf takes a minillm GPT, got {type(gpt).__name__}")
    c = gpt.config
    if c.positions != "learned":
        raise InputError(
            f"to_hf needs positions='learned': GPT-2 adds a learned position table and has no "
            f"rotary embeddings, but this model uses positions={c.positions!r}"
        )
    hf_config = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=4 * c.n_embd,
        activation_function="gelu_new",
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        layer_norm_epsilon=_LAYER_NORM_EPS,
        tie_word_embeddings=c.tie_weights,
        bos_token_id=None,  # GPT-2's defaults (50256) would lie outside a small vocabulary
        eos_token_id=None,
    )
    weight = gpt.tok_emb.weight
    hf = GPT2LMHeadModel(hf_config).to(device=weight.device, dtype=weight.dtype)
    hf.load_state_dict(_gpt_to_hf_state(gpt.state_dict(), c.n_layer))
    return hf.train(gpt.training)


def _config_from_hf(hf_config: Any) -> GPTConfig:
    """The GPTConfig of a GPT-2 config, or one error listing everything that cannot map."""
    problems = []
    if hf_config.activation_function not in _TANH_GELUS:
        problems.append(
            f"activation_function={hf_config.activation_function!r} (minillm uses the tanh GELU, "
            "'gelu_new')"
        )
    if abs(hf_config.layer_norm_epsilon - _LAYER_NORM_EPS) > 1e-12:
        problems.append(f"layer_norm_epsilon={hf_config.layer_norm_epsilon} (minillm uses 1e-5)")
    if hf_config.n_inner not in (None, 4 * hf_config.n_embd):
        problems.append(f"n_inner={hf_config.n_inner} (minillm's MLP is 4 * n_embd wide)")
    if not hf_config.scale_attn_weights or hf_config.scale_attn_by_inverse_layer_idx:
        problems.append("attention scores not scaled by 1/sqrt(head_dim) alone")
    if hf_config.add_cross_attention:
        problems.append("add_cross_attention=True (minillm's GPT has no cross-attention)")
    if problems:
        raise InputError(
            "this GPT-2 config does not map onto minillm's GPT: " + "; ".join(problems)
        )
    return GPTConfig(
        vocab_size=hf_config.vocab_size,
        block_size=hf_config.n_positions,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_embd=hf_config.n_embd,
        dropout=float(hf_config.resid_pdrop),  # minillm uses one rate for all three of GPT-2's
        bias=True,
        positions="learned",
        tie_weights=bool(hf_config.tie_word_embeddings),
    )


def from_hf(hf_model: PreTrainedModel) -> GPT:
    """A minillm `GPT` holding a copy of a `GPT2LMHeadModel`'s weights, on its device and dtype,
    in the same train/eval mode."""
    from transformers import GPT2LMHeadModel

    if not isinstance(hf_model, GPT2LMHeadModel):
        model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
        raise InputTypeError(
            f"from_hf takes a transformers GPT2LMHeadModel, got {type(hf_model).__name__}"
            + (f" (model_type {model_type!r})" if model_type else "")
        )
    config = _config_from_hf(hf_model.config)
    weight = hf_model.transformer.wte.weight
    gpt = GPT(config).to(device=weight.device, dtype=weight.dtype)
    gpt.load_state_dict(_hf_to_gpt_state(hf_model.state_dict(), config.n_layer))
    return gpt.train(hf_model.training)


def save_pretrained(gpt: GPT, folder: str | Path, tokenizer: Any = None) -> Path:
    """Write `gpt` as a Hugging Face GPT-2 folder (config.json, model.safetensors,
    generation_config.json; the tokenizer's files too if given) and return the folder.

    `AutoModelForCausalLM.from_pretrained(folder)` then loads it without a network, and
    `AutoTokenizer.from_pretrained(folder)` loads the tokenizer. `tokenizer` must be a
    `transformers` tokenizer; its end-of-text token, if it has one, becomes the model's end and
    padding token for generation.
    """
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise InputTypeError(
            f"tokenizer must be a transformers tokenizer (it needs save_pretrained), got "
            f"{type(tokenizer).__name__}; wrap a `tokenizers` Tokenizer in "
            "PreTrainedTokenizerFast(tokenizer_object=...)"
        )
    folder = Path(folder)
    hf = to_hf(gpt)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        for config in (hf.config, hf.generation_config):
            config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    hf.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def load_gpt2(name_or_folder: str | Path) -> GPT:
    """Load a GPT-2 checkpoint into the course GPT: a folder (such as one `save_pretrained`
    wrote), or a Hub name like "gpt2" (needs internet the first time, then the Hub cache)."""
    from transformers import AutoModelForCausalLM

    try:
        hf = AutoModelForCausalLM.from_pretrained(str(name_or_folder))
    except OSError as exc:
        raise InputError(
            f"could not load a GPT-2 checkpoint from {str(name_or_folder)!r}: give a folder "
            f"holding config.json and the weights, or a Hub name with internet access ({exc})"
        ) from None
    return from_hf(hf.eval())
