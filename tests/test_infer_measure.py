"""Chapter 11's training, caching, timing and speculative-decoding helpers in minillm.infer:
LayerDrop and distillation training, the model cache, per-token timing, and speculative
sampling checked against the target model's own distribution and greedy tokens."""

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from minillm import infer
from minillm.errors import InputError
from minillm.generate import generate
from minillm.model import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=12, block_size=16, n_layer=3, n_head=2, n_embd=16)
TOKENS = np.tile(np.arange(12), 40)  # a stream a model can learn quickly: 0 1 2 ... 11 0 1 ...


def fresh(config=CONFIG, seed=0):
    torch.manual_seed(seed)
    return GPT(config)


# -- training -------------------------------------------------------------------------------


def test_blocks_kept_runs_a_subset_of_the_same_blocks_and_restores_them():
    model = fresh().eval()
    idx = torch.randint(0, 12, (2, 8))
    every = list(model.blocks)
    with infer.blocks_kept(model, [0, 2]) as smaller:
        kept = smaller(idx)[0]
        assert list(smaller.blocks) == [every[0], every[2]]
    assert list(model.blocks) == every
    torch.testing.assert_close(kept, infer.drop_layers(model, [0, 2])(idx)[0])


def test_train_lm_learns_and_is_repeatable():
    a, b = fresh(), fresh()
    losses = infer.train_lm(a, TOKENS, 40, batch_size=8, learning_rate=1e-2, seed=3)
    assert infer.train_lm(b, TOKENS, 40, batch_size=8, learning_rate=1e-2, seed=3) == losses
    assert losses[-1] < 0.5 * losses[0]
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_layerdrop_skips_blocks_so_skipped_blocks_get_no_gradient_on_that_step():
    model = fresh()
    seen = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *_, i=i: seen.append(i))
    infer.train_lm(model, TOKENS, 40, batch_size=4, layerdrop=0.5, seed=0)
    runs = np.bincount(seen, minlength=3)
    assert 0 < runs.min() and runs.max() < 40  # each block ran on some steps and not on others
    assert abs(runs.sum() / 120 - 0.5) < 0.2
    with pytest.raises(InputError, match="layerdrop"):
        infer.train_lm(model, TOKENS, 1, layerdrop=1.0)


def test_distillation_with_alpha_one_moves_the_student_to_the_teacher():
    teacher = fresh(seed=1)
    infer.train_lm(teacher, TOKENS, 60, batch_size=8, seed=0)
    student = fresh(seed=2)
    x = torch.from_numpy(TOKENS[None, :16].astype(np.int64))

    def gap():
        with torch.no_grad():
            return torch.nn.functional.kl_div(
                student.eval()(x)[0].log_softmax(-1),
                teacher.eval()(x)[0].log_softmax(-1),
                log_target=True,
                reduction="batchmean",
            ).item()

    before = gap()
    infer.train_lm(student, TOKENS, 60, batch_size=8, teacher=teacher, alpha=1.0, seed=0)
    assert gap() < 0.3 * before


def test_cached_model_trains_once_and_reads_the_weights_back(tmp_path):
    calls = []

    def train(model):
        calls.append(1)
        infer.train_lm(model, TOKENS, 5, batch_size=4)

    first = infer.cached_model(fresh(), train, {"run": "a"}, tmp_path)
    second = infer.cached_model(fresh(seed=9), train, {"run": "a"}, tmp_path)
    assert len(calls) == 1
    for p1, p2 in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(p1, p2)
    infer.cached_model(fresh(), train, {"run": "b"}, tmp_path)  # another key trains again
    bigger = GPTConfig(vocab_size=12, block_size=16, n_layer=2, n_head=2, n_embd=16)
    infer.cached_model(fresh(bigger), train, {"run": "a"}, tmp_path)  # another shape too
    assert len(calls) == 3
    assert not list(tmp_path.glob("*.part"))


def test_cached_model_keeps_shared_blocks_shared(tmp_path):
    def train(model):
        infer.train_lm(model, TOKENS, 3, batch_size=4)

    infer.cached_model(infer.share_blocks(fresh()), train, {"shared": True}, tmp_path)
    again = infer.cached_model(infer.share_blocks(fresh()), train, {"shared": True}, tmp_path)
    assert again.blocks[0] is again.blocks[2]
    assert again.num_parameters() == infer.share_blocks(fresh()).num_parameters()


# -- timing ---------------------------------------------------------------------------------


def test_step_seconds_times_one_step_and_leaves_no_state_behind():
    model = fresh()
    for position in (0, 5, 15):
        for use_cache in (True, False):
            assert infer.step_seconds(model, position, use_cache, repeats=2) > 0
    for bad in (-1, 16):
        with pytest.raises(InputError, match="position"):
            infer.step_seconds(model, bad, True)


# -- speculative decoding -------------------------------------------------------------------


def test_speculative_accept_gives_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.1, 0.5, 0.3, 0.1])
    q = torch.tensor([0.4, 0.1, 0.1, 0.4])
    n = 100_000
    drafted = torch.multinomial(q.expand(n, -1), 1, replacement=True, generator=g).squeeze(1)
    tokens, accepted = infer.speculative_accept(p.expand(n, -1), q.expand(n, -1), drafted, g)
    counts = torch.bincount(tokens, minlength=4).numpy()
    expected = p.double().numpy() / p.double().sum().item() * n
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    tv = 0.5 * (p - q).abs().sum().item()
    assert abs(accepted.float().mean().item() - (1 - tv)) < 0.01
    assert torch.equal(tokens[accepted], drafted[accepted])
    # a draft equal to the target is always accepted (and the zero residual never sampled)
    same, ok = infer.speculative_accept(p.expand(50, -1), p.expand(50, -1), drafted[:50], g)
    assert ok.all() and torch.equal(same, drafted[:50])
    with pytest.raises(InputError, match="p and q"):
        infer.speculative_accept(p[None], q[None, :3], drafted[:1])


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_decoding_gives_the_targets_greedy_tokens(k):
    target, draft = (
        fresh(seed=0),
        fresh(GPTConfig(vocab_size=12, block_size=16, n_layer=1, n_head=2, n_embd=8), seed=1),
    )
    prompt = torch.tensor([[3, 1, 4]])
    out, stats_ = infer.speculative_generate(target, draft, prompt, 13, k=k, temperature=0)
    assert torch.equal(out, generate(target, prompt, 13, temperature=0))
    assert stats_.target_calls <= 13 and stats_.accepted <= stats_.drafted
    same, all_kept = infer.speculative_generate(target, target, prompt, 13, k=k, temperature=0)
    assert torch.equal(same, out) and all_kept.acceptance_rate == 1.0


def test_sampled_speculative_continuations_follow_the_target_distribution():
    """Two new tokens from one prompt, 1,000 times: the frequencies of the 9 possible pairs
    against the target's exact joint probabilities (chi-square), with a draft that disagrees."""
    vocab = 3
    small = GPTConfig(vocab_size=vocab, block_size=8, n_layer=1, n_head=2, n_embd=8)
    target, draft = fresh(small, seed=0), fresh(small, seed=5)
    with torch.no_grad():
        for w in target.lm_head.weight, draft.lm_head.weight:
            w.mul_(20)  # sharpen both so that they disagree visibly
    prompt = torch.tensor([[1]])
    pairs = list(itertools.product(range(vocab), repeat=2))
    with torch.no_grad():
        expected = []
        for a, b in pairs:
            logp = target(torch.tensor([[1, a]]))[0].log_softmax(-1)
            expected.append((logp[0, 0, a] + logp[0, 1, b]).exp().item())
    g = torch.Generator().manual_seed(0)
    counts = np.zeros(len(pairs))
    for _ in range(1000):
        out, _ = infer.speculative_generate(target, draft, prompt, 2, k=2, generator=g)
        counts[pairs.index(tuple(out[0, 1:].tolist()))] += 1
    expected = np.array(expected) * 1000
    keep = expected > 5  # chi-square needs expected counts of about 5 or more
    assert counts[~keep].sum() <= max(10, 3 * expected[~keep].sum())
    scaled = expected[keep] * counts[keep].sum() / expected[keep].sum()
    assert stats.chisquare(counts[keep], scaled).pvalue > 1e-3


def test_speculative_generate_refuses_what_it_cannot_do():
    target = fresh()
    other = fresh(GPTConfig(vocab_size=13, block_size=16, n_layer=1, n_head=2, n_embd=8))
    prompt = torch.tensor([[1, 2]])
    with pytest.raises(InputError, match="vocabulary"):
        infer.speculative_generate(target, other, prompt, 3)
    with pytest.raises(InputError, match="context"):
        infer.speculative_generate(target, target, prompt, 15)
    with pytest.raises(InputError, match="one prompt"):
        infer.speculative_generate(target, target, prompt.expand(2, -1), 3)


# -- compressed checkpoints -----------------------------------------------------------------


@pytest.fixture
def run_folder(tmp_path):
    from minillm import checkpoint
    from minillm.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.train("abcdefghijkl")
    model = fresh()
    checkpoint.save(
        tmp_path / "run", 7, model, {"step": 7}, {"model": CONFIG.to_dict()}, tokenizer=tokenizer
    )
    return tmp_path / "run", model


@pytest.mark.parametrize("bits", [8, 4])
def test_a_compressed_checkpoint_is_smaller_and_samples_like_the_quantised_model(
    run_folder, tmp_path, bits
):
    from minillm import checkpoint
    from minillm.sample import load_for_sampling

    run, model = run_folder
    out = infer.write_compressed(run, tmp_path / f"int{bits}", bits=bits)
    assert infer.folder_bytes(out) < infer.folder_bytes(checkpoint.resolve(run))
    checkpoint.verify(out)  # a manifest like any checkpoint's
    loaded, tokenizer = infer.load_compressed(out)
    assert tokenizer.decode(tokenizer.encode("abc")) == "abc"
    reference = infer.quantize_model(load_for_sampling(run)[0], bits)
    idx = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], reference(idx)[0])
    prompt = torch.tensor([[1, 2]])
    assert torch.equal(
        generate(loaded, prompt, 10, temperature=0), generate(reference, prompt, 10, temperature=0)
    )


def test_compressed_checkpoints_refuse_bad_input_and_damage(run_folder, tmp_path):
    from minillm import checkpoint

    run, _ = run_folder
    with pytest.raises(InputError, match="bits"):
        infer.write_compressed(run, tmp_path / "x", bits=3)
    with pytest.raises(checkpoint.CheckpointError):
        infer.write_compressed(tmp_path / "nothing", tmp_path / "y")
    with pytest.raises(InputError, match="new folder"):
        infer.write_compressed(run, checkpoint.resolve(run))
    with pytest.raises(InputError, match="not a compressed checkpoint"):
        infer.load_compressed(checkpoint.resolve(run))
    out = infer.write_compressed(run, tmp_path / "int8")
    weights = out / checkpoint.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(checkpoint.CheckpointError):
        infer.load_compressed(out)


def test_minillm_compress_then_sample_reads_the_quantised_weights(run_folder, tmp_path, capsys):
    """The command line's way to a compressed checkpoint: `minillm compress` writes it and says
    how much smaller it is; `minillm sample` on it generates what the quantised model does."""
    from minillm import checkpoint, cli
    from minillm.sample import generate_text, load_for_sampling

    run, _ = run_folder
    assert cli.main(["compress", str(run), str(tmp_path / "int4"), "--bits", "4"]) == 0
    printed = capsys.readouterr().out
    before, after = (infer.folder_bytes(p) for p in (checkpoint.resolve(run), tmp_path / "int4"))
    assert f"{before:,} bytes" in printed and f"{after:,} bytes" in printed
    loaded, tokenizer = load_for_sampling(tmp_path / "int4")
    reference = infer.quantize_model(load_for_sampling(run)[0], 4)
    expected = generate_text(reference, tokenizer, "ab", 8, temperature=0)
    assert (
        cli.main(
            [
                "sample",
                "--checkpoint",
                str(tmp_path / "int4"),
                "--prompt",
                "ab",
                "--tokens",
                "8",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == expected.strip()
    assert generate_text(loaded, tokenizer, "ab", 8, temperature=0) == expected


@pytest.mark.parametrize(
    "record", ['{"bits": 8}', "[8]", '{"bits": 8, "scheme": "absmax", "per_channel": "yes"}']
)
def test_a_compression_record_from_elsewhere_is_refused(run_folder, tmp_path, record):
    """compression.json is read from a folder that may come from anywhere: anything but the
    record write_compressed writes is one InputError, never a KeyError or TypeError."""
    from minillm import checkpoint

    run, _ = run_folder
    out = infer.write_compressed(run, tmp_path / "int8")
    (out / infer.COMPRESSION).write_text(record)
    checkpoint.write_manifest(out)  # a consistent folder: only the record is foreign
    with pytest.raises(InputError, match="not what write_compressed writes"):
        infer.load_compressed(out)
