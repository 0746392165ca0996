"""minillm.evaluate: multiple-choice scoring by log-likelihood and perplexity, checked on models
whose log-probabilities are known by hand (a bigram table, computed in float64 with `math`), on a
GPT that memorised its text, and on the corpus task's construction."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from minillm.errors import InputError, InputTypeError
from minillm.evaluate import (
    MultipleChoice,
    continuation_task,
    multiple_choice_accuracy,
    perplexity,
    predicted,
    score_options,
)
from minillm.model import GPT, GPTConfig
from minillm.tokenizer import CharTokenizer

ALPHABET = "abcd "
TOK = CharTokenizer(list(ALPHABET))


class Bigram(nn.Module):
    """logits[t] = log P(next | idx[t]) from a fixed table: the model's log-likelihood of any
    text is a sum of table entries, computable by hand."""

    def __init__(self, probs, block_size=8):
        super().__init__()
        self.probs = probs
        self.table = nn.Parameter(torch.tensor(probs, dtype=torch.float64).log())
        self.config = SimpleNamespace(block_size=block_size)

    def forward(self, idx):
        return self.table[idx], None

    def logprob(self, previous: str, text: str) -> float:
        """By hand: sum of log P(c | the character before it), the first after `previous`."""
        ids = TOK.encode(previous[-1] + text)
        return sum(math.log(self.probs[a][b]) for a, b in zip(ids[:-1], ids[1:], strict=True))


def _random_bigram(seed=0, block_size=8):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(len(ALPHABET)), size=len(ALPHABET))
    return Bigram(probs.tolist(), block_size)


def test_option_scores_are_the_hand_computed_log_likelihoods():
    model = _random_bigram()
    options = ["a", "bcd", "d dab", " "]
    scores = score_options(model, TOK, "cab d", options)
    for option, score in zip(options, scores, strict=True):
        assert score.logprob == pytest.approx(model.logprob("cab d", option), rel=1e-12)
        assert score.n_tokens == score.n_chars == len(option)
        assert score.score("per_token") == pytest.approx(score.logprob / len(option), rel=1e-12)


def test_length_normalisation_changes_the_winner():
    """Every token costs log-probability, so the summed score prefers a short option: here the
    true option, 4 likely tokens (p = 0.6 each: total 4 log 0.6 = -2.04, mean -0.51), loses on
    the sum to one unlikely token (p = 0.15: -1.90), and wins per token and per character."""
    probs = [[0.1] * 5 for _ in ALPHABET]
    probs[TOK.encode("a")[0]] = [0.6, 0.1, 0.1, 0.05, 0.15]  # after "a": a 0.6, " " 0.15
    model = Bigram(probs)
    item = MultipleChoice("ba", (" ", "aaaa"), answer=1)
    scores = score_options(model, TOK, item.context, item.options)
    assert scores[0].logprob == pytest.approx(math.log(0.15))
    assert scores[1].logprob == pytest.approx(4 * math.log(0.6))
    assert predicted(scores, "sum") == 0
    assert predicted(scores, "per_token") == predicted(scores, "per_char") == 1
    result = multiple_choice_accuracy(model, TOK, [item])
    assert result.accuracy == {"sum": 0.0, "per_token": 1.0, "per_char": 1.0}


def test_a_tie_goes_to_the_first_option():
    uniform = Bigram([[0.2] * 5 for _ in ALPHABET])
    scores = score_options(uniform, TOK, "ab", ["cd", "dc", "ab"])
    assert scores[0].logprob == scores[1].logprob == scores[2].logprob == 2 * math.log(0.2)
    first = MultipleChoice("ab", ("cd", "dc"), answer=0)
    second = MultipleChoice("ab", ("cd", "dc"), answer=1)
    assert multiple_choice_accuracy(uniform, TOK, [first]).accuracy["per_char"] == 1.0
    assert multiple_choice_accuracy(uniform, TOK, [second]).accuracy["per_char"] == 0.0
    assert multiple_choice_accuracy(uniform, TOK, [first, second]).chance == 0.5


def _memorised_gpt(text, tok, steps=200):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=1, n_embd=32))
    ids = torch.tensor(tok.encode(text))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    windows = ids.unfold(0, 25, 1)  # every window of block_size + 1 tokens
    order = torch.randint(len(windows), (steps, 16), generator=torch.Generator().manual_seed(0))
    for rows in order:
        _, loss = model(windows[rows, :-1], windows[rows, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), loss.item()


def test_a_model_that_memorised_its_text_picks_every_true_continuation():
    """A GPT trained to memorise two lines scores 100% on items cut from them, under every
    normalisation, and its perplexity on them is near 1; an untrained one is near chance."""
    text = "when shall we three meet again\nin thunder, lightning, or in rain?\n" * 8
    tok = CharTokenizer.train(text)
    items = continuation_task(text, 20, context_chars=12, words=(1, 2), seed=0)
    model, loss = _memorised_gpt(text, tok)
    assert loss < 0.2
    result = multiple_choice_accuracy(model, tok, items)
    assert result.accuracy == {"sum": 1.0, "per_token": 1.0, "per_char": 1.0}
    assert perplexity(model, tok.encode(text)) < 1.2
    torch.manual_seed(1)
    untrained = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=1, n_embd=32))
    assert multiple_choice_accuracy(untrained, tok, items).accuracy["per_char"] < 0.6


def test_items_scored_in_batches_score_as_one_at_a_time():
    """Many items' options padded into one forward pass: each option's log-probability is the one
    `score_options` gives it alone (float32 logits, so to 1e-4), and so are the accuracies."""
    from minillm import evaluate

    text = "when shall we three meet again\nin thunder, lightning, or in rain?\n" * 8
    tok = CharTokenizer.train(text)
    items = continuation_task(text, 40, context_chars=12, words=(1, 3), seed=1)
    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=2, n_embd=32)).eval()
    rows = [row for it in items for row in evaluate._option_rows(tok, 24, it.context, it.options)]
    batched = evaluate._score_rows(model, rows)
    alone = [o.logprob for it in items for o in score_options(model, tok, it.context, it.options)]
    assert len({len(ids) for ids, _, _ in rows}) > 1  # rows of several lengths share the padding
    assert batched == pytest.approx(alone, abs=1e-4)
    one_by_one = multiple_choice_accuracy(model, tok, items, items_per_batch=1)
    assert multiple_choice_accuracy(model, tok, items, items_per_batch=7) == one_by_one
    with pytest.raises(InputError, match="items_per_batch"):
        multiple_choice_accuracy(model, tok, items, items_per_batch=0)


def test_a_context_longer_than_the_model_reads_is_cut_on_the_left():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(ALPHABET), block_size=8, n_layer=1, n_embd=16)).eval()
    long_context = "abcdabcd dcba abc"
    options = ["ab", "dcba d"]
    scores = score_options(model, TOK, long_context, options)
    for option, score in zip(options, scores, strict=True):
        # block_size + 1 = 9 tokens: the last 9 - len(option) context characters, then the option
        kept = long_context[-(9 - len(option)) :]
        alone = score_options(model, TOK, kept, [option, "a"])[0]
        assert score.logprob == pytest.approx(alone.logprob, abs=1e-9)
    with pytest.raises(InputError, match="longer than the context"):
        model(torch.tensor([TOK.encode(long_context)]))


def test_perplexity_equals_the_hand_computed_one():
    """Every token after the first is predicted once, windows or not: for a bigram model the
    perplexity is exp(-mean log P(b | a)) over all adjacent pairs, by hand."""
    model = _random_bigram(seed=3, block_size=7)
    ids = np.random.default_rng(0).integers(0, len(ALPHABET), size=100)
    by_hand = math.exp(
        -np.mean([math.log(model.probs[a][b]) for a, b in zip(ids[:-1], ids[1:], strict=True)])
    )
    for batch_size in (1, 3, 32):
        assert perplexity(model, ids, batch_size=batch_size) == pytest.approx(by_hand, rel=1e-12)
    uniform = Bigram([[0.2] * 5 for _ in ALPHABET])
    assert perplexity(uniform, ids) == pytest.approx(5.0, rel=1e-12)
    assert perplexity(model, ids[:2]) == pytest.approx(1 / model.probs[ids[0]][ids[1]])


def test_the_corpus_task_is_reproducible_and_made_of_the_texts_own_continuations():
    text = "".join(f"line {i} has words like w{i % 7} and v{i % 5}\n" for i in range(400))
    items = continuation_task(text, 40, context_chars=30, seed=5)
    assert items == continuation_task(text, 40, context_chars=30, seed=5)
    assert items != continuation_task(text, 40, context_chars=30, seed=6)
    for item in items:
        assert len(item.context) in (29, 30) and len(set(item.options)) == 4
        assert item.context + item.options[item.answer] in text
        assert all(option.strip() in text for option in item.options)
    assert len({item.answer for item in items}) == 4, "the true option sits at every index"
    lengths = {len(option) for item in items for option in item.options}
    assert len(lengths) > 5, "options of many lengths"


@pytest.mark.parametrize(
    "context, options, answer, error, message",
    [
        ("ab", (), 0, InputError, "at least 2 options"),
        ("ab", "cd", 0, InputError, "at least 2 options"),
        ("ab", ("c",), 0, InputError, "at least 2 options"),
        ("ab", ("c", ""), 0, InputError, "option 1 must be a non-empty str"),
        ("ab", ("c", "d"), 2, InputError, "answer 2 is not an option's index"),
        ("ab", ("c", "d"), "0", InputTypeError, "answer must be an option's index"),
        (3, ("c", "d"), 0, InputTypeError, "context must be a str"),
    ],
)
def test_malformed_items_give_clear_errors(context, options, answer, error, message):
    with pytest.raises(error, match=message):
        MultipleChoice(context, options, answer)


def test_scoring_bad_input_gives_clear_errors():
    model = _random_bigram(block_size=4)
    with pytest.raises(InputError, match="options must be a non-empty list"):
        score_options(model, TOK, "ab", [])
    with pytest.raises(InputError, match="the context is empty"):
        score_options(model, TOK, "", ["a", "b"])
    with pytest.raises(InputError, match="option 1 is empty"):
        score_options(model, TOK, "ab", ["a", ""])
    with pytest.raises(InputError, match="option 0 is 5 tokens, more than the model reads"):
        score_options(model, TOK, "ab", ["abcda", "b"])
    with pytest.raises(InputError, match="no items"):
        multiple_choice_accuracy(model, TOK, [])
    with pytest.raises(InputError, match="at least 2 token ids"):
        perplexity(model, [1])
    with pytest.raises(InputError, match="too few"):
        continuation_task("a b c d e f", 3, context_chars=2)
    with pytest.raises(InputError, match="normalisation must be one of"):
        score_options(model, TOK, "ab", ["a", "b"])[0].score("per_byte")


def test_minillm_eval_reports_a_checkpoints_accuracy_and_perplexity(tmp_path, capsys):
    """`minillm eval RUN` prints what the library computes on the run's validation split."""
    from minillm import data
    from minillm.cli import main
    from minillm.sample import load_for_sampling
    from minillm.train import Trainer
    from minillm.train_config import load_config
    from minillm.utils import repo_root

    overrides = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32"]  # block_size 64
    overrides += ["batch_size=4", "max_iters=10", "eval_interval=10", "eval_iters=1"]
    overrides += ["checkpoint_interval=10", "sample_tokens=0", f"out_dir={tmp_path / 'run'}"]
    config = load_config(repo_root() / "configs/train/shakespeare_char.yaml", overrides)
    Trainer(config, progress=False).fit()
    assert main(["eval", str(tmp_path / "run"), "--items", "12", "--seed", "3"]) == 0
    printed = capsys.readouterr().out

    model, tok = load_for_sampling(tmp_path / "run")
    _, val_ids = data.train_val_split(data.load_tokens("tinyshakespeare", tok))
    items = continuation_task(tok.decode(val_ids), 12, seed=3)
    accuracy = multiple_choice_accuracy(model, tok, items).accuracy
    assert f"accuracy {accuracy['per_char']:.1%} per character" in printed
    assert f"perplexity {perplexity(model, val_ids):.3f} per token" in printed
    assert main(["eval", str(tmp_path / "run"), "--items", "0"]) == 2
    assert "n_items must be > 0" in capsys.readouterr().err
