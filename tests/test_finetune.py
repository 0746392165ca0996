"""Chapter 10's fine-tuning methods against independent references: hand values in float64,
torch's cross-entropy, PEFT's LoRA, and the GPT run on the same tokens."""

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from minillm import finetune as ft
from minillm.errors import InputError, InputTypeError
from minillm.generate import generate
from minillm.model import GPT, GPTConfig
from minillm.tokenizer import CharTokenizer

CONFIG = GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture
def gpt():
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer.train("abcdefghijklmnopqrstuvwxyz :\n")


# -- supervised fine-tuning --------------------------------------------------------------------


def test_sft_tokens_mask_the_prompt_by_hand():
    inputs, targets = ft.sft_tokens([1, 2, 3], [4, 5], block_size=8)
    assert inputs == [1, 2, 3, 4]
    assert targets == [-100, -100, 4, 5]  # position 2 (token 3) predicts the first answer token


def test_sft_loss_is_the_cross_entropy_of_the_response_only(gpt):
    inputs, targets = ft.sft_tokens([7, 8, 9, 10, 11], [12, 13, 14], block_size=16)
    _, loss = gpt(torch.tensor([inputs]), torch.tensor([targets]))
    logits, _ = gpt(torch.tensor([inputs]))
    logp = F.log_softmax(logits[0].double(), dim=-1)
    by_hand = -(logp[4, 12] + logp[5, 13] + logp[6, 14]) / 3  # the 3 answer tokens, nothing else
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-6)


def test_sft_refuses_what_does_not_fit_or_is_empty():
    with pytest.raises(InputError, match="block_size"):
        ft.sft_tokens(list(range(10)), list(range(8)), block_size=16)  # 18 tokens > 17
    ft.sft_tokens(list(range(10)), list(range(7)), block_size=16)  # 17 tokens fit exactly
    with pytest.raises(InputError, match="non-empty"):
        ft.sft_tokens([1, 2], [], block_size=16)


def test_right_padding_changes_no_real_position(gpt, tokenizer):
    examples = [ft.Example("ab:", "cd\n"), ft.Example("abcdef:", "ghijk\n")]
    inputs, targets = ft.sft_batch(examples, tokenizer, block_size=16)
    assert inputs.shape == (2, 12) and (targets[0, 5:] == -100).all()
    batched, _ = gpt(inputs)
    for row, example in enumerate(examples):
        alone, _ = ft.sft_batch([example], tokenizer, block_size=16)
        logits, _ = gpt(alone)
        torch.testing.assert_close(batched[row, : alone.shape[1]], logits[0], atol=1e-5, rtol=0)


def test_instruction_examples_are_right_and_repeatable():
    text = "to be or not to be that is the question whether tis nobler in the mind"
    examples = ft.instruction_examples(text, 40, seed=3)
    assert examples == ft.instruction_examples(text, 40, seed=3)
    for e in examples:
        assert e.response.endswith("\n")
        verb, phrase = e.prompt.rstrip("\n").split(": ")
        words = phrase.split()
        expected = phrase.upper() if verb == "Shout" else " ".join(words[::-1])
        assert e.response == expected + "\n", e
    with pytest.raises(InputError):
        ft.instruction_examples("a b", 4)


def test_preference_pairs_reject_the_unchanged_words():
    examples = [
        ft.Example("Shout: to be\n", "TO BE\n"),
        ft.Example("Reverse: to be\n", "be to\n"),
        ft.Example("Reverse: be\n", "be\n"),  # no wrong answer of this kind: left out
    ]
    assert ft.preference_pairs(examples) == [
        ft.Preference("Shout: to be\n", "TO BE\n", "to be\n"),
        ft.Preference("Reverse: to be\n", "be to\n", "to be\n"),
    ]


def test_question_lines_are_balanced_and_lose_their_final_mark():
    text = "\n".join(
        [f"Wherefore art thou here number {i}?" for i in range(6)]
        + [f"I am here and that is number {i}." for i in range(6)]
        + ["Too short?", "Another plain line without a mark"]
    )
    texts, labels = ft.question_lines(text, 8, seed=2)
    assert sorted(labels) == [0] * 4 + [1] * 4
    for t, label in zip(texts, labels, strict=True):
        assert t[-1] not in "?." and t.startswith("Wherefore" if label else "I am")
    with pytest.raises(InputError, match="too few"):
        ft.question_lines(text, 14)


def test_training_lowers_the_response_loss_and_answers(gpt, tokenizer):
    """A few hundred steps of SFT on one example teach it exactly: the loop really trains."""
    example = ft.Example("ab:", "cab\n")
    inputs, targets = ft.sft_batch([example], tokenizer, block_size=16)
    gpt.train()
    losses = ft.train_steps(
        lambda: gpt(inputs, targets)[1], gpt.parameters(), 150, 3e-3, progress=False
    )
    assert losses[-1] < 0.05 < losses[0]
    assert ft.answer(gpt, tokenizer, "ab:") == "cab"
    assert ft.exact_match(gpt, tokenizer, [example]) == 1.0


def test_answer_is_the_greedy_continuation_cut_at_stop_and_ends_there(gpt, tokenizer):
    idx = torch.tensor([tokenizer.encode("ab:")])
    free = generate(gpt, idx, 12, temperature=0)
    text = tokenizer.decode(free[0, 3:].tolist())
    assert ft.answer(gpt, tokenizer, "ab:", 12, stop="") == text
    stop = text[3]  # a one-token stop: generation ends at its first occurrence
    steps = []
    gpt.lm_head.register_forward_hook(lambda *_: steps.append(1))
    assert ft.answer(gpt, tokenizer, "ab:", 12, stop=stop) == text.split(stop)[0]
    assert len(steps) == text.index(stop) + 1
    two_tokens = text[1:3]  # not one token: the text is cut, generation runs to the end
    assert ft.answer(gpt, tokenizer, "ab:", 12, stop=two_tokens) == text.split(two_tokens)[0]


def test_train_steps_refuses_a_fully_frozen_model(gpt):
    gpt.requires_grad_(False)
    with pytest.raises(InputError, match="nothing would be trained"):
        ft.train_steps(lambda: torch.tensor(0.0), gpt.parameters(), 1, 1e-3, progress=False)


def test_batches_of_visits_every_item_once_per_epoch():
    next_batch = ft.batches_of(list(range(10)), 4, seed=1)
    seen = [x for _ in range(5) for x in next_batch()]  # 20 items: two whole epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))


# -- hidden states, classification ----------------------------------------------------------------


def test_hidden_states_are_what_the_head_scores(gpt):
    idx = torch.randint(0, CONFIG.vocab_size, (3, 10))
    torch.testing.assert_close(gpt.lm_head(gpt.hidden_states(idx)), gpt(idx)[0])


def test_a_prefix_of_token_embeddings_equals_those_tokens(gpt):
    """Prepending the embeddings of tokens is the same as prepending the tokens: positions and
    attention treat prefix vectors as ordinary tokens."""
    idx = torch.randint(0, CONFIG.vocab_size, (2, 9))
    prefix = gpt.tok_emb(idx[:, :4])
    torch.testing.assert_close(gpt.hidden_states(idx[:, 4:], prefix=prefix), gpt.hidden_states(idx))
    with pytest.raises(InputError, match="longer than the context"):
        gpt.hidden_states(torch.zeros(1, 14, dtype=torch.long), prefix=torch.zeros(1, 3, 16))
    with pytest.raises(InputError, match="n_embd=16"):
        gpt.hidden_states(idx, prefix=torch.zeros(1, 3, 8))


def test_last_token_states_pick_each_rows_last_real_token():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    picked = ft.last_token_states(hidden, torch.tensor([2, 4]))
    torch.testing.assert_close(picked, torch.stack([hidden[0, 1], hidden[1, 3]]))
    for bad in (torch.tensor([0, 4]), torch.tensor([2, 5]), torch.tensor([2])):
        with pytest.raises(InputError):
            ft.last_token_states(hidden, bad)


def test_last_token_pooling_reads_the_whole_text_and_first_token_pooling_does_not(gpt, tokenizer):
    torch.manual_seed(1)
    texts = ["abc", "abd", "abcdefg"]
    idx, lengths = ft.encode_batch(texts, tokenizer, block_size=16)
    last = ft.SequenceClassifier(gpt, 2, pooling="last").eval()
    scores = last(idx, lengths)
    assert not torch.allclose(scores[0], scores[1])  # they differ in their last letter
    alone = [last(*ft.encode_batch([t], tokenizer, 16))[0] for t in texts]
    torch.testing.assert_close(scores, torch.stack(alone), atol=1e-5, rtol=0)  # padding unseen
    first = ft.SequenceClassifier(gpt, 2, pooling="first").eval()
    first_scores = first(idx, lengths)
    assert torch.allclose(first_scores[0], first_scores[1]) and torch.allclose(
        first_scores[0], first_scores[2]
    )  # every text starts with "a": position 0 cannot tell them apart
    with pytest.raises(InputError, match="pooling"):
        ft.SequenceClassifier(gpt, 2, pooling="mean")
    with pytest.raises(InputError, match="block_size=16"):
        ft.encode_batch(["a" * 17], tokenizer, block_size=16)


def test_classifier_learns_a_label_only_the_last_token_shows(gpt, tokenizer):
    texts = [a + b + c for a in "ab" for b in "cd" for c in "xy"]
    labels = torch.tensor([t.endswith("y") for t in texts]).long()
    idx, lengths = ft.encode_batch(texts, tokenizer, block_size=16)
    results = {}
    for pooling in ("last", "first"):
        torch.manual_seed(0)
        model = ft.SequenceClassifier(GPT(CONFIG), 2, pooling=pooling).train()
        ft.train_steps(
            lambda model=model: F.cross_entropy(model(idx, lengths), labels),
            model.parameters(),
            60,
            3e-3,
            progress=False,
        )
        results[pooling] = ft.accuracy(model, idx, lengths, labels)
    assert results == {"last": 1.0, "first": 0.5}


# -- reward model and DPO -------------------------------------------------------------------------


def test_reward_model_loss_by_hand():
    loss = ft.reward_model_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log(2)) / 2, rel=1e-6)


def test_sequence_logprobs_equal_summed_cross_entropy(gpt):
    inputs = torch.randint(0, CONFIG.vocab_size, (2, 8))
    targets = torch.randint(0, CONFIG.vocab_size, (2, 8))
    targets[0, :3] = -100
    logits, _ = gpt(inputs)
    expected = torch.stack(
        [
            -F.cross_entropy(logits[i], targets[i], ignore_index=-100, reduction="sum")
            for i in (0, 1)
        ]
    )
    torch.testing.assert_close(ft.sequence_logprobs(gpt, inputs, targets), expected)


def test_dpo_loss_by_hand_in_float64():
    policy_c, policy_r = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_c, ref_r = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])
    loss, chosen, rejected = ft.dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.5)
    margins = [0.5 * ((-3.0 + 3.5) - (-4.0 + 3.0)), 0.5 * ((-5.0 + 4.0) - (-2.0 + 2.5))]
    by_hand = sum(math.log1p(math.exp(-m)) for m in margins) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    torch.testing.assert_close(chosen, torch.tensor([0.25, -0.5]))
    torch.testing.assert_close(rejected, torch.tensor([-0.5, 0.25]))
    # Where the policy is still the reference, every answer's reward is 0 and the loss log 2.
    same, *_ = ft.dpo_loss(policy_c, policy_r, policy_c, policy_r)
    assert same.item() == pytest.approx(math.log(2), rel=1e-6)
    with pytest.raises(InputError):
        ft.dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0)


def test_dpo_raises_the_chosen_answer_against_a_frozen_reference(gpt, tokenizer):
    chosen = ft.sft_batch([ft.Example("ab:", "yes\n")], tokenizer, 16)
    rejected = ft.sft_batch([ft.Example("ab:", "no\n")], tokenizer, 16)
    with torch.no_grad():
        ref = ft.sequence_logprobs(gpt, *chosen), ft.sequence_logprobs(gpt, *rejected)
    policy = GPT(CONFIG)
    policy.load_state_dict(gpt.state_dict())

    def loss():
        c, r = ft.sequence_logprobs(policy, *chosen), ft.sequence_logprobs(policy, *rejected)
        return ft.dpo_loss(c, r, *ref, beta=0.5)[0]

    losses = ft.train_steps(loss, policy.parameters(), 20, 1e-3, progress=False)
    assert losses[0] == pytest.approx(math.log(2), rel=1e-5) and losses[-1] < 0.3
    with torch.no_grad():
        assert ft.sequence_logprobs(policy, *chosen) > ref[0]


# -- LoRA ---------------------------------------------------------------------------------------


def test_lora_starts_as_the_base_model_and_trains_only_its_matrices(gpt):
    idx = torch.randint(0, CONFIG.vocab_size, (2, 8))
    before, _ = gpt(idx)
    names = ft.add_lora(gpt, r=2, alpha=4)
    assert names == [f"blocks.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    torch.testing.assert_close(gpt(idx)[0], before)  # B = 0
    trainable, total = ft.parameter_counts(gpt)
    assert trainable == 4 * 2 * (16 + 16)  # 4 layers x r x (in + out)
    assert total == GPT(CONFIG).num_parameters() + trainable
    gpt(idx, idx)[1].backward()
    grads = {n for n, p in gpt.named_parameters() if p.grad is not None}
    assert grads == {n for n in ft.lora_state_dict(gpt)}
    assert len(grads) == 8 and all(n.endswith(("lora_A", "lora_B")) for n in grads)


def test_lora_equals_peft_with_the_same_matrices(gpt):
    idx = torch.randint(0, CONFIG.vocab_size, (2, 8))
    theirs = GPT(CONFIG).eval()
    theirs.load_state_dict(gpt.state_dict())
    theirs = inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]), theirs
    )
    names = ft.add_lora(gpt, r=2, alpha=6)
    for name in names:
        ours, peft_layer = gpt.get_submodule(name), theirs.get_submodule(name)
        with torch.no_grad():
            ours.lora_B.normal_()  # make the update non-zero
            peft_layer.lora_A["default"].weight.copy_(ours.lora_A)
            peft_layer.lora_B["default"].weight.copy_(ours.lora_B)
    torch.testing.assert_close(gpt(idx)[0], theirs(idx)[0], atol=1e-5, rtol=1e-5)


def test_merged_lora_computes_the_same_function_with_plain_layers(gpt):
    ft.add_lora(gpt, targets=("q_proj", "up_proj"), r=3, alpha=3)
    for module in gpt.modules():
        if isinstance(module, ft.LoRALinear):
            with torch.no_grad():
                module.lora_B.normal_()
            assert torch.linalg.matrix_rank(module.delta_weight()) <= 3
    idx = torch.randint(0, CONFIG.vocab_size, (2, 8))
    adapted, _ = gpt(idx)
    assert ft.merge_lora(gpt) == 4
    assert not any(isinstance(m, ft.LoRALinear) for m in gpt.modules())
    torch.testing.assert_close(gpt(idx)[0], adapted, atol=1e-5, rtol=1e-5)


def test_lora_refuses_bad_layers_and_ranks(gpt):
    with pytest.raises(InputTypeError):
        ft.LoRALinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(InputError, match="larger than"):
        ft.LoRALinear(nn.Linear(16, 4), r=5)
    with pytest.raises(InputError, match="no nn.Linear named"):
        ft.add_lora(gpt, targets=("query",))


# -- soft prompts, costs -------------------------------------------------------------------------


def test_soft_prompt_starts_as_real_tokens_and_trains_only_its_vectors(gpt):
    soft = ft.SoftPrompt(gpt, n_virtual=3, seed=5)
    picks = torch.randint(CONFIG.vocab_size, (3,), generator=torch.Generator().manual_seed(5))
    idx = torch.randint(0, CONFIG.vocab_size, (2, 6))
    logits, _ = soft(idx)
    full, _ = gpt(torch.cat((picks.expand(2, -1), idx), dim=1))
    torch.testing.assert_close(logits, full[:, 3:])
    assert ft.parameter_counts(soft)[0] == 3 * 16
    _, loss = soft(idx, idx)
    loss.backward()
    assert soft.prompt.grad is not None and gpt.tok_emb.weight.grad is None
    with pytest.raises(InputError, match="no room"):
        ft.SoftPrompt(gpt, n_virtual=16)


def test_finetune_state_bytes(gpt):
    n = GPT(CONFIG).num_parameters()
    parts = ("parameters", "gradients", "master_weights", "optimizer_states")
    assert ft.finetune_state_bytes(gpt) == dict(zip(parts, (4 * n, 4 * n, 0, 8 * n), strict=True))
    ft.add_lora(gpt, r=2, alpha=4)
    t = 4 * 2 * 32
    fp32 = ft.finetune_state_bytes(gpt)
    assert fp32 == dict(zip(parts, (4 * (n + t), 4 * t, 0, 8 * t), strict=True))
    bf16 = ft.finetune_state_bytes(gpt, "bf16")
    assert bf16 == dict(zip(parts, (2 * (n + t), 2 * t, 4 * t, 8 * t), strict=True))
