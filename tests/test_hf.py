"""Tests of minillm.hf: the course GPT and transformers' GPT2LMHeadModel give the same logits,
both ways, and a saved folder loads offline with AutoModelForCausalLM."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from minillm.errors import InputError, InputTypeError
from minillm.generate import generate
from minillm.hf import from_hf, load_gpt2, save_pretrained, to_hf
from minillm.model import GPT, GPTConfig

# float32 logits of the two implementations agree to rounding (measured: about 1e-6).
LOGITS_ATOL = 1e-5


def random_gpt(**overrides) -> GPT:
    """A small GPT whose every weight is random: zero biases or unit LayerNorm gains would hide
    a bias or a gain that lands in the wrong place."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=4, n_embd=32, **overrides)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def random_hf(**overrides) -> GPT2LMHeadModel:
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=4, **overrides)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


IDX = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(("bias", "tie_weights"), [(True, True), (False, True), (True, False)])
def test_to_hf_gives_the_same_logits(bias, tie_weights):
    gpt = random_gpt(bias=bias, tie_weights=tie_weights)
    hf = to_hf(gpt)
    assert isinstance(hf, GPT2LMHeadModel) and not hf.training
    assert hf.config.tie_word_embeddings == tie_weights
    with torch.no_grad():
        torch.testing.assert_close(hf(IDX).logits, gpt(IDX)[0], rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("tie", [True, False])
def test_from_hf_gives_the_same_logits(tie):
    hf = random_hf(tie_word_embeddings=tie)
    gpt = from_hf(hf)
    assert gpt.config.tie_weights == tie and gpt.config.block_size == 16
    with torch.no_grad():
        torch.testing.assert_close(gpt(IDX)[0], hf(IDX).logits, rtol=0, atol=LOGITS_ATOL)


def test_round_trip_keeps_every_weight_exactly():
    gpt = random_gpt(dropout=0.1)
    back = from_hf(to_hf(gpt))
    assert back.config == gpt.config
    ours, theirs = gpt.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_conversion_keeps_dtype():
    gpt = random_gpt().double()
    hf = to_hf(gpt)
    assert hf.dtype == torch.float64
    assert from_hf(hf).lm_head.weight.dtype == torch.float64


def test_rotary_and_unmappable_configs_get_clear_errors():
    with pytest.raises(InputError, match="to_hf needs positions='learned'.*'rotary'"):
        to_hf(random_gpt(positions="rotary"))
    with pytest.raises(InputError, match="activation_function='relu'.*n_inner=48"):
        from_hf(random_hf(activation_function="relu", n_inner=48))
    with pytest.raises(InputTypeError, match="GPT2LMHeadModel, got Linear"):
        from_hf(torch.nn.Linear(2, 2))


def test_saved_folder_loads_with_automodel_and_generates_like_minillm(tmp_path):
    gpt = random_gpt()
    save_pretrained(gpt, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)  # a local folder: no network involved
    assert isinstance(hf, GPT2LMHeadModel)
    prompt = IDX[:, :4]
    theirs = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False
    )
    assert torch.equal(theirs, generate(gpt, prompt, 10, temperature=0))


def test_save_pretrained_writes_the_tokenizer_and_its_end_token(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = ["<eos>"] + [chr(c) for c in range(ord("a"), ord("a") + 39)]
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    save_pretrained(random_gpt(), tmp_path, tokenizer=tokenizer)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("abc")["input_ids"] == [1, 2, 3]
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.eos_token_id == 0
    with pytest.raises(InputTypeError, match="transformers tokenizer"):
        save_pretrained(random_gpt(), tmp_path, tokenizer=object())


def test_load_gpt2_reads_a_checkpoint_folder(tmp_path):
    """What load_gpt2("gpt2") does with internet, on a small random GPT-2 saved here."""
    hf = random_hf()
    hf.save_pretrained(tmp_path)
    gpt = load_gpt2(tmp_path)
    assert isinstance(gpt, GPT) and not gpt.training
    with torch.no_grad():
        torch.testing.assert_close(gpt(IDX)[0], hf(IDX).logits, rtol=0, atol=LOGITS_ATOL)


def test_load_gpt2_names_a_missing_folder(tmp_path):
    with pytest.raises(InputError, match="could not load a GPT-2 checkpoint"):
        load_gpt2(tmp_path / "missing")
