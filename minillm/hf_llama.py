"""The course Llama and Hugging Face `transformers`' `LlamaForCausalLM`, converted into each other
(`minillm.hf` does the same for the GPT and GPT-2).

Both are the same architecture with the same layer names below the top level, and both store
`nn.Linear` weights `(out, in)`, so the conversion renames and, for one pairing, permutes:

| minillm `Llama`                           | `LlamaForCausalLM` (under `model.` but `lm_head`) |
|-------------------------------------------|---------------------------------------------------|
| `tok_emb`                                 | `embed_tokens`                                    |
| `blocks[i].self_attn.{q,k,v,o}_proj`      | `layers[i].self_attn.{q,k,v,o}_proj`              |
| `blocks[i].mlp.{gate,up,down}_proj`       | `layers[i].mlp.{gate,up,down}_proj`               |
| `blocks[i].ln_1`, `blocks[i].ln_2`        | `input_layernorm`, `post_attention_layernorm`     |
| `ln_f`, `lm_head`                         | `norm`, `lm_head`                                 |

transformers rotates with the rotate-half pairing. A Llama with `rope_pairing="interleaved"`
(Meta's layout) has its q_proj and k_proj rows permuted on the way
(`minillm.llama.interleaved_to_half`), which is how Meta's checkpoints become transformers' ones.

In eval mode both compute the same logits. Dropout maps to `attention_dropout` only (transformers'
Llama has no other dropout), so training with dropout differs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from minillm.errors import InputError, InputTypeError, unknown_name
from minillm.llama import PAIRINGS, Llama, LlamaConfig, half_to_interleaved, interleaved_to_half

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedModel

# minillm name -> transformers name, within a block
_BLOCK_NAMES = {
    **{f"self_attn.{p}_proj.weight": f"self_attn.{p}_proj.weight" for p in "qkvo"},
    **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def _names(n_layer: int) -> dict[str, str]:
    """Every minillm parameter name -> its transformers name."""
    names = dict(_TOP_NAMES)
    for i in range(n_layer):
        for ours, theirs in _BLOCK_NAMES.items():
            names[f"blocks.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def _permute_rotary(state: dict[str, Tensor], config: LlamaConfig, permute) -> None:
    """Apply `permute` to every q_proj / k_proj weight of a minillm `state` (in place), with the
    head count of each: n_head for queries, n_kv_head for keys."""
    for i in range(config.n_layer):
        for proj, heads in (("q", config.n_head), ("k", config.n_kv_head)):
            name = f"blocks.{i}.self_attn.{proj}_proj.weight"
            state[name] = permute(state[name], heads)


def to_hf(llama: Llama) -> LlamaForCausalLM:
    """A `transformers.LlamaForCausalLM` holding a copy of `llama`'s weights, on its device and
    dtype, in the same train/eval mode."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    if not isinstance(llama, Llama):
        raise InputTypeError(f"to_hf takes a minillm Llama, got {type(llama).__name__}")
    c = llama.config
    hf_config = HFLlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head,
        head_dim=c.head_dim,
        hidden_act="silu",
        max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_base},
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=c.dropout,
        tie_word_embeddings=c.tie_weights,
        bos_token_id=None,  # Llama's defaults (1, 2) are not tokens of a course vocabulary
        eos_token_id=None,
    )
    weight = llama.tok_emb.weight
    hf = LlamaForCausalLM(hf_config).to(device=weight.device, dtype=weight.dtype)
    state = llama.state_dict()
    if c.rope_pairing == "interleaved":
        _permute_rotary(state, c, interleaved_to_half)
    hf.load_state_dict({theirs: state[ours] for ours, theirs in _names(c.n_layer).items()})
    return hf.train(llama.training)


def _config_from_hf(hf_config: Any, rope_pairing: str) -> LlamaConfig:
    """The LlamaConfig of a transformers Llama config, or one error listing what cannot map."""
    problems = []
    if hf_config.hidden_act != "silu":
        problems.append(f"hidden_act={hf_config.hidden_act!r} (minillm's SwiGLU uses 'silu')")
    if hf_config.attention_bias or hf_config.mlp_bias:
        problems.append("attention_bias or mlp_bias (minillm's Llama has no biases)")
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim not in (None, hf_config.hidden_size // hf_config.num_attention_heads):
        problems.append(f"head_dim={head_dim} (minillm uses hidden_size // num_attention_heads)")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type={rope['rope_type']!r} (minillm has the default rotary only)")
    if getattr(hf_config, "pretraining_tp", 1) not in (None, 1):
        problems.append(f"pretraining_tp={hf_config.pretraining_tp} (use 1)")
    if problems:
        raise InputError(
            "this Llama config does not map onto minillm's Llama: " + "; ".join(problems)
        )
    return LlamaConfig(
        vocab_size=hf_config.vocab_size,
        block_size=hf_config.max_position_embeddings,
        n_layer=hf_config.num_hidden_layers,
        n_head=hf_config.num_attention_heads,
        n_kv_head=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        n_embd=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        norm_eps=float(hf_config.rms_norm_eps),
        rope_base=float(rope.get("rope_theta", 10000.0)),
        rope_pairing=rope_pairing,
        dropout=float(hf_config.attention_dropout),
        tie_weights=bool(hf_config.tie_word_embeddings),
    )


def from_hf(hf_model: PreTrainedModel, rope_pairing: str = "half") -> Llama:
    """A minillm `Llama` holding a copy of a `LlamaForCausalLM`'s weights, on its device and
    dtype, in the same train/eval mode. `rope_pairing="interleaved"` gives the model in Meta's
    layout (q_proj and k_proj rows permuted), which computes the same logits."""
    from transformers import LlamaForCausalLM

    if not isinstance(hf_model, LlamaForCausalLM):
        model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
        raise InputTypeError(
            f"from_hf takes a transformers LlamaForCausalLM, got {type(hf_model).__name__}"
            + (f" (model_type {model_type!r})" if model_type else "")
        )
    if rope_pairing not in PAIRINGS:
        raise unknown_name("rope_pairing", rope_pairing, PAIRINGS)
    config = _config_from_hf(hf_model.config, rope_pairing)
    theirs = hf_model.state_dict()
    state = {ours: theirs[name] for ours, name in _names(config.n_layer).items()}
    if rope_pairing == "interleaved":
        _permute_rotary(state, config, half_to_interleaved)
    weight = hf_model.model.embed_tokens.weight
    llama = Llama(config).to(device=weight.device, dtype=weight.dtype)
    llama.load_state_dict(state)
    return llama.train(hf_model.training)
