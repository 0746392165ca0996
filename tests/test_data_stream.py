"""Data that streams: the on-disk token cache, the train/val split, the batch sampler (shift by
one, determinism, exact resume, errors), encoding text chunk by chunk in bounded memory
(`encode_iterable`, `encode_file`), and document packing (`pack_documents`, checked against each
document run alone through the GPT and the Llama)."""

import gc
import hashlib
import io
import json
import random
import tracemalloc

import numpy as np
import pytest
import torch

from minillm.attention import document_mask, document_positions
from minillm.data import (
    CORPORA,
    Corpus,
    TokenBatchSampler,
    cached_path,
    load_text,
    load_tokens,
    pack_documents,
    token_dtype,
    tokens_path,
    train_val_split,
)
from minillm.errors import InputError, InputTypeError
from minillm.llama import Llama, LlamaConfig
from minillm.model import GPT, GPTConfig, KVCache
from minillm.tokenizer import ENDOFTEXT, BPETokenizer, CharTokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 30


@pytest.fixture
def tiny_corpus(tmp_path, monkeypatch) -> str:
    """A registered corpus named 'tiny' already in a temporary data cache."""
    raw = TEXT.encode()
    monkeypatch.setenv("MINILLM_DATA", str(tmp_path))
    monkeypatch.setitem(
        CORPORA,
        "tiny",
        Corpus(
            name="tiny",
            url="http://127.0.0.1:9/never-fetched",
            sha256=hashlib.sha256(raw).hexdigest(),
            size=len(raw),
            filename="input.txt",
            description="a test corpus",
        ),
    )
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "input.txt").write_bytes(raw)
    return "tiny"


def _counting(tok: BPETokenizer, monkeypatch) -> list[str]:
    """Record every file `tok.encode_file` is called with."""
    calls = []
    encode_file = tok.encode_file

    def counted(path, **kwargs):
        calls.append(path)
        return encode_file(path, **kwargs)

    monkeypatch.setattr(tok, "encode_file", counted)
    return calls


def test_token_cache_lies_beside_the_corpus_and_a_second_load_does_not_re_encode(
    tiny_corpus, monkeypatch
):
    tok = BPETokenizer.train(TEXT, 300)
    calls = _counting(tok, monkeypatch)
    ids = load_tokens(tiny_corpus, tok, progress=False)
    path = tokens_path(tiny_corpus, tok)
    assert path.parent == cached_path(tiny_corpus).parent and path.is_file()
    assert CORPORA["tiny"].sha256[:16] in path.name and tok.fingerprint[:16] in path.name
    assert ids.dtype == np.uint16 and tok.decode(ids) == TEXT and len(calls) == 1
    written = path.stat().st_mtime_ns

    again = load_tokens(tiny_corpus, tok, progress=False)
    assert len(calls) == 1, "the cached ids were encoded again"
    assert path.stat().st_mtime_ns == written
    np.testing.assert_array_equal(again, ids)


def test_another_tokenizer_gets_its_own_cache_file(tiny_corpus):
    small, large = BPETokenizer.train(TEXT, 280), BPETokenizer.train(TEXT, 320)
    assert tokens_path(tiny_corpus, small) != tokens_path(tiny_corpus, large)
    assert len(load_tokens(tiny_corpus, large)) < len(load_tokens(tiny_corpus, small))


def test_token_dtype_is_the_smallest_that_fits():
    assert token_dtype(512) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.int32


def test_split_keeps_the_first_part_for_training_and_the_last_for_validation():
    ids = np.arange(1000)
    train, val = train_val_split(ids)
    assert (len(train), len(val)) == (900, 100)
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)
    train, val = train_val_split(ids, val_fraction=0.25)
    assert train[-1] == 749 and val[0] == 750


@pytest.mark.parametrize(
    "fraction, error",
    [(0, InputError), (1.0, InputError), (-0.1, InputError), ("0.1", InputTypeError)],
)
def test_split_rejects_fractions_outside_zero_to_one(fraction, error):
    with pytest.raises(error, match="val_fraction"):
        train_val_split(np.arange(100), fraction)


def test_split_of_too_few_tokens_is_an_error():
    with pytest.raises(InputError, match="3 tokens are too few"):
        train_val_split(np.arange(3), 0.1)


def test_batches_are_windows_with_targets_shifted_by_one():
    """With ids 0..999 a window starting at s is s, s+1, ...: so x rows count up by one and
    y = x + 1 exactly."""
    x, y = next(TokenBatchSampler(np.arange(1000, dtype=np.uint16), block_size=16, batch_size=8))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], x[:, :-1] + 1)
    torch.testing.assert_close(y, x + 1)
    assert int(y.max()) <= 999


def test_batches_of_real_tokens_are_windows_of_the_stream(tiny_corpus):
    ids = load_tokens(tiny_corpus, BPETokenizer.train(TEXT, 300))
    windows = {tuple(w) for w in np.lib.stride_tricks.sliding_window_view(ids, 33).tolist()}
    sampler = TokenBatchSampler(ids, 32, 4, seed=3)
    for _ in range(5):
        x, y = next(sampler)
        torch.testing.assert_close(y[:, :-1], x[:, 1:])
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            assert tuple(row) in windows


def test_a_stream_one_token_longer_than_a_block_has_one_window():
    x, y = next(TokenBatchSampler(np.arange(9), block_size=8, batch_size=2))
    torch.testing.assert_close(x, torch.arange(8).repeat(2, 1))
    torch.testing.assert_close(y, torch.arange(1, 9).repeat(2, 1))


def test_the_same_seed_gives_the_same_batches_and_another_seed_others():
    ids = np.arange(10_000)

    def batches(seed):
        sampler = TokenBatchSampler(ids, 64, 8, seed=seed)
        return torch.stack([next(sampler)[0] for _ in range(4)])

    torch.testing.assert_close(batches(0), batches(0))
    assert not torch.equal(batches(0), batches(1))


def test_resuming_from_a_saved_state_continues_exactly():
    """Checkpoint after 5 batches (through torch.save, as a training checkpoint would), then a
    fresh sampler that loads it gives bitwise the batches the first one gives next."""
    ids = np.random.default_rng(0).integers(0, 512, size=5_000).astype(np.uint16)
    first = TokenBatchSampler(ids, 32, 4, seed=7)
    for _ in range(5):
        next(first)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    json.dumps(first.state_dict())  # plain ints: fits in any checkpoint format
    expected = [next(first) for _ in range(3)]

    resumed = TokenBatchSampler(ids, 32, 4, seed=0)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    for (x, y), (ex, ey) in zip((next(resumed) for _ in range(3)), expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_a_state_from_a_different_batch_shape_is_refused():
    state = TokenBatchSampler(np.arange(100), 8, 4).state_dict()
    with pytest.raises(InputError, match="batch_size=4, this one has 2"):
        TokenBatchSampler(np.arange(100), 8, 2).load_state_dict(state)
    with pytest.raises(InputError, match="keys"):
        TokenBatchSampler(np.arange(100), 8, 4).load_state_dict({"step": 3})


def test_batches_go_to_the_requested_device():
    x, y = next(TokenBatchSampler(np.arange(100), 8, 2, device="meta"))
    assert x.device.type == y.device.type == "meta"


@pytest.mark.parametrize(
    "ids, block_size, batch_size, error, message",
    [
        (np.arange(10), 10, 2, InputError, r"block_size \(10\) must be smaller than .* \(10\)"),
        (np.arange(10), 4, 0, InputError, "batch_size must be > 0"),
        (np.arange(10), 4, -3, InputError, "batch_size must be > 0"),
        (np.arange(10), 0, 2, InputError, "block_size must be > 0"),
        (np.arange(10), 4, 2.5, InputTypeError, "batch_size must be an integer"),
        (np.linspace(0, 1, 10), 4, 2, InputTypeError, "integer token ids"),
        (np.zeros((2, 10), dtype=int), 4, 2, InputTypeError, "1-D"),
    ],
)
def test_sampler_bad_arguments_give_clear_errors(ids, block_size, batch_size, error, message):
    with pytest.raises(error, match=message):
        TokenBatchSampler(ids, block_size, batch_size)


# ---------------------------------------------------------------------------------------------
# Streaming encode: chunk by chunk, the same ids as the whole text
# ---------------------------------------------------------------------------------------------

SPECIALS = [ENDOFTEXT, "<|a|>", "<|a|>b"]  # the last two: one special token begins another


@pytest.fixture(scope="module")
def corpus_text() -> str:
    return load_text(progress=False)


@pytest.fixture(scope="module")
def tok(corpus_text) -> BPETokenizer:
    return BPETokenizer.train(corpus_text[:100_000], 400, special_tokens=SPECIALS)


def _cut(text, sizes):
    """`text` cut into consecutive chunks of the given sizes (the last takes the rest)."""
    chunks, at = [], 0
    for n in sizes:
        chunks.append(text[at : at + n])
        at += n
    return [*chunks, text[at:]]


def _random_chunks(seq, rng, largest):
    sizes = []
    while sum(sizes) < len(seq):
        sizes.append(rng.randint(1, largest))
    return _cut(seq, sizes)


def test_streamed_ids_equal_the_whole_texts_for_random_chunk_sizes(tok, corpus_text):
    text = corpus_text[-30_000:]  # the validation end: text the tokenizer did not train on
    whole = tok.encode(text)
    rng = random.Random(0)
    for largest in (1, 2, 5, 64, 4096):
        chunks = _random_chunks(text, rng, largest)
        assert list(tok.encode_iterable(chunks)) == whole, f"chunks of 1..{largest} characters"
    assert list(tok.encode_iterable([text])) == whole
    assert list(tok.encode_iterable(list(text[:3000]))) == tok.encode(text[:3000])


@pytest.mark.parametrize(
    "text",
    [
        "we'll see, they're here, I've",  # contractions decided by the 2 characters after "'"
        "a  \n  b\t\t c   ",  # whitespace runs: the last space joins the next word
        "12 345 6789!!! ...?",
        "x<|endoftext|>y<|a|>z<|a|>bw<|a|",  # specials, one a prefix of another, one unfinished
        "<|endoftext|><|endoftext|>",
        "<|endo<|endoftext|>",
        "",
        "é\u0301 naïve café 🙂🙂 日本語の文 ﷽",  # multi-byte, a combining mark, wide characters
    ],
)
def test_every_two_cut_split_gives_the_whole_texts_ids(tok, text):
    """Each text cut at every pair of places (and at every single place): the hard boundaries,
    a contraction, a whitespace run, a special token, are each cut at every character."""
    for allow_special in (True, False):
        whole = tok.encode(text, allow_special=allow_special)
        for i in range(len(text) + 1):
            for j in range(i, len(text) + 1):
                chunks = [text[:i], text[i:j], text[j:]]
                got = list(tok.encode_iterable(chunks, allow_special=allow_special))
                assert got == whole, chunks


def test_random_texts_of_boundary_prone_pieces_stream_exactly(tok):
    rng = random.Random(1)
    alphabet = ["a", "lo", " ", "  ", "\n", "\t", "'", "ll", "s", "re", "7", "é", "🙂", "!", "."]
    alphabet += [ENDOFTEXT, "<|", "endo", "ftext|>", "<|a|>", "b", "\u0301"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        chunks = _random_chunks(text, rng, 6)
        assert list(tok.encode_iterable(chunks)) == tok.encode(text), chunks


def test_utf8_characters_split_between_byte_chunks_come_out_whole(tok, tmp_path):
    text = "Ça va? 🙂 naïve — 日本語 " * 50 + ENDOFTEXT + " fin"
    data = text.encode()
    whole = tok.encode(text)
    rng = random.Random(2)
    for largest in (1, 2, 3, 7):
        chunks = _random_chunks(data, rng, largest)
        assert any((c[-1] & 0xC0) == 0xC0 for c in chunks if c), "no chunk ends inside a character"
        assert list(tok.encode_iterable(chunks)) == whole
    (tmp_path / "t.txt").write_bytes(data)
    assert list(tok.encode_file(tmp_path / "t.txt", chunk_chars=5)) == whole


def test_the_char_tokenizer_streams_too(tmp_path):
    text = "héllo wörld\n" * 20
    char = CharTokenizer.train(text)
    data = text.encode()
    chunks = _random_chunks(data, random.Random(3), 3)
    assert list(char.encode_iterable(chunks)) == char.encode(text)
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    assert list(char.encode_file(tmp_path / "t.txt", chunk_chars=1)) == char.encode(text)


def test_load_tokens_streams_the_corpus_to_the_ids_of_the_whole_text(tiny_corpus):
    tok = BPETokenizer.train(TEXT, 300)
    np.testing.assert_array_equal(load_tokens(tiny_corpus, tok), tok.encode(TEXT))


def _peak_bytes(fn) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_a_file_holds_a_bounded_amount_of_memory(tok, corpus_text, tmp_path):
    """Files of 250 kB and 1 MB of corpus lines in random order: streaming through them 8,192
    characters at a time (counting the ids, not keeping them) peaks under half the large file's
    size, and no higher for the large file than for the small one, while encoding the small file
    whole peaks above its size (the text, its pieces, its ids). The piece cache is warmed first:
    it is the tokenizer's own state, bounded by its size limit, not by the file's length."""
    lines = corpus_text.splitlines(keepends=True)
    rng = random.Random(4)
    sizes = {}
    for name, n_bytes in (("small", 250_000), ("large", 1_000_000)):
        chosen, total = [], 0
        while total < n_bytes:
            chosen.append(rng.choice(lines))
            total += len(chosen[-1])
        (tmp_path / f"{name}.txt").write_text("".join(chosen), encoding="utf-8")
        sizes[name] = total
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    for path in (small, large):  # warms the cache
        assert sum(1 for _ in tok.encode_file(path, chunk_chars=1 << 13)) > sizes["small"] / 5

    def stream(path):
        return lambda: sum(1 for _ in tok.encode_file(path, chunk_chars=1 << 13))

    peak_small, peak_large = _peak_bytes(stream(small)), _peak_bytes(stream(large))
    peak_whole = _peak_bytes(lambda: tok.encode(small.read_text(encoding="utf-8")))
    print(f"peak: streaming {peak_small:,} / {peak_large:,} B; whole {peak_whole:,} B")
    assert peak_large < sizes["large"] / 2 and peak_large < 1.5 * peak_small + 50_000
    assert peak_whole > sizes["small"]
    assert sum(1 for _ in tok.encode_file(small)) == len(tok.encode(small.read_text()))


def test_a_long_run_without_boundaries_is_held_whole_and_still_exact(tok):
    text = "ab" * 20_000 + " end"
    assert list(tok.encode_iterable(_cut(text, [999] * 40))) == tok.encode(text)


@pytest.mark.parametrize(
    "chunks, error, message",
    [
        ("a whole str", InputTypeError, "got one str"),
        (b"some bytes", InputTypeError, "got one bytes"),
        (["ok", 3], InputTypeError, "chunk 1 must be str or bytes, got int"),
        ([b"ok", b"\xff\xfe"], InputError, "chunk 1 is not UTF-8: byte 2"),
        ([b"caf", "é".encode()[:1]], InputError, "end inside a UTF-8 character"),
        (["fine", "\ud800"], InputError, "lone surrogate U\\+D800"),
    ],
)
def test_bad_chunks_give_clear_errors(tok, chunks, error, message):
    with pytest.raises(error, match=message):
        list(tok.encode_iterable(chunks))


def test_encode_file_rejects_a_bad_chunk_size_and_a_missing_file(tok, tmp_path):
    with pytest.raises(InputError, match="chunk_chars"):
        list(tok.encode_file(tmp_path / "t.txt", chunk_chars=0))
    with pytest.raises(FileNotFoundError):
        list(tok.encode_file(tmp_path / "missing.txt"))


# ---------------------------------------------------------------------------------------------
# Document packing
# ---------------------------------------------------------------------------------------------

EOT = 9


def test_packing_lays_documents_end_to_end_with_an_end_of_text_token():
    """Documents of 3, 1, 5 and 0 tokens in rows of 8: [3 + EOT, 1 + EOT] fill 6 of the first
    row, [5 + EOT] does not fit in the 2 left and opens the second, the empty one is just EOT."""
    packed = pack_documents([[1, 2, 3], [4], [5, 6, 7, 8, 1], []], block_size=8, eot_id=EOT)
    assert packed.input_ids.tolist() == [
        [1, 2, 3, EOT, 4, EOT, EOT, EOT],
        [5, 6, 7, 8, 1, EOT, EOT, EOT],
    ]
    assert packed.targets.tolist() == [
        [2, 3, EOT, -100, EOT, -100, -100, -100],
        [6, 7, 8, 1, EOT, -100, -100, -100],  # the empty document's EOT predicts nothing
    ]
    assert packed.doc_ids.tolist() == [[0, 0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0, 1, 2]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 0, 0]]


def test_the_attention_mask_is_block_diagonal_and_causal():
    """Against a mask built by hand: one lower-triangular block per document."""
    packed = pack_documents([[1, 2], [3, 4, 5], [6]], block_size=10, eot_id=EOT)
    expected = torch.zeros(10, 10, dtype=torch.bool)
    for begin, end in [(0, 3), (3, 7), (7, 9), (9, 10)]:  # 3 documents + EOT, then padding
        expected[begin:end, begin:end] = torch.ones(end - begin, end - begin).tril().bool()
    assert torch.equal(packed.attention_mask, expected[None, None])
    assert packed.attention_mask.sum(-1).min() >= 1, "every query sees at least itself"


def test_a_document_longer_than_a_row_is_cut_into_pieces_of_a_row():
    packed = pack_documents([list(range(1, 12))], block_size=4, eot_id=EOT)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, EOT]]
    assert packed.targets[:, -1].tolist() == [-100, -100, -100]
    assert packed.doc_ids.tolist() == [[0] * 4] * 3


def _documents(vocab_size, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size - 1, (n,), generator=g).tolist() for n in lengths]


MODELS = {
    "gpt-learned": lambda: GPT(GPTConfig(vocab_size=32, block_size=24, n_layer=2, n_embd=32)),
    "gpt-rotary": lambda: GPT(
        GPTConfig(vocab_size=32, block_size=24, n_layer=2, n_embd=32, positions="rotary")
    ),
    "gpt-manual": lambda: GPT(
        GPTConfig(vocab_size=32, block_size=24, n_layer=2, n_embd=32, attention="manual")
    ),
    "llama-gqa": lambda: Llama(
        LlamaConfig(vocab_size=32, block_size=24, n_layer=2, n_embd=32, n_head=4, n_kv_head=2)
    ),
    "llama-interleaved-manual": lambda: Llama(
        LlamaConfig(
            vocab_size=32,
            block_size=24,
            n_layer=2,
            n_embd=32,
            rope_pairing="interleaved",
            attention="manual",
        )
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_rows_give_every_document_the_logits_it_has_alone(name):
    """In float64: the logits at each document's positions of a packed row equal the logits of
    that document (with its EOT) run on its own, to 1e-12 (and so do the padding's); the packed
    loss equals the mean of the per-document token losses."""
    torch.manual_seed(0)
    model = MODELS[name]().double().eval()
    eot = model.config.vocab_size - 1
    docs = _documents(model.config.vocab_size, [5, 0, 11, 3, 7, 16, 1])
    packed = pack_documents(docs, model.config.block_size, eot)
    assert packed.input_ids.shape[0] >= 2 and packed.doc_ids.amax() >= 3  # several per row
    with torch.no_grad():
        logits, loss = model(packed.input_ids, packed.targets, doc_ids=packed.doc_ids)
        losses, checked = [], 0
        for row in range(packed.input_ids.shape[0]):
            for doc in packed.doc_ids[row].unique():
                at = packed.doc_ids[row] == doc  # a document, or a row's padding (EOTs)
                alone, _ = model(packed.input_ids[row, at][None])
                torch.testing.assert_close(logits[row, at], alone[0], rtol=0, atol=1e-12)
                targets = packed.targets[row, at]
                keep = targets != -100
                losses += torch.nn.functional.cross_entropy(
                    alone[0][keep], targets[keep], reduction="none"
                ).tolist()
                checked += 1
    assert checked == int((packed.doc_ids.amax(1) + 1).sum()) >= len(docs)
    assert loss.item() == pytest.approx(sum(losses) / len(losses), abs=1e-12)


def test_without_the_mask_documents_would_see_each_other():
    """The check above can fail: the same row run as one causal sequence differs at the second
    document's positions (it attends to the first and sits at later positions)."""
    torch.manual_seed(0)
    model = MODELS["gpt-learned"]().double().eval()
    packed = pack_documents([[1, 2, 3], [4, 5, 6]], 8, 31)
    with torch.no_grad():
        packed_logits, _ = model(packed.input_ids, doc_ids=packed.doc_ids)
        plain, _ = model(packed.input_ids)
    torch.testing.assert_close(packed_logits[0, :4], plain[0, :4], rtol=0, atol=1e-12)
    assert (packed_logits[0, 4:8] - plain[0, 4:8]).abs().max() > 1e-3


def test_packed_training_steps_backpropagate():
    torch.manual_seed(0)
    model = MODELS["llama-gqa"]()
    packed = pack_documents(_documents(32, [4, 9, 2, 12]), 24, 31)
    _, loss = model(packed.input_ids, packed.targets, doc_ids=packed.doc_ids)
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize(
    "documents, block_size, eot_id, error, message",
    [
        ([[1, 2]], 0, 9, InputError, "block_size must be > 0"),
        ([[1, 2]], 8, -1, InputTypeError, "eot_id must be a token id"),
        ([[1, 2]], 8, 9.0, InputTypeError, "eot_id must be a token id"),
        ([], 8, 9, InputError, "at least one document"),
        ("some text", 8, 9, InputTypeError, "not text"),
        ([[1.5, 2.0]], 8, 9, InputTypeError, "document 0 must be a 1-D sequence of integer"),
        ([[1], [[1, 2]]], 8, 9, InputTypeError, "document 1 must be a 1-D"),
    ],
)
def test_packing_bad_arguments_give_clear_errors(documents, block_size, eot_id, error, message):
    with pytest.raises(error, match=message):
        pack_documents(documents, block_size, eot_id)


def test_document_ids_that_are_not_runs_or_do_not_fit_the_model_are_refused():
    model = MODELS["gpt-learned"]()
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(InputError, match="must not decrease"):
        document_mask(torch.tensor([[0, 1, 0, 1]]))
    with pytest.raises(InputTypeError, match="integer tensor"):
        document_positions(torch.zeros(1, 4))
    with pytest.raises(InputError, match="idx's shape"):
        model(idx, doc_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(InputError, match="no prefix and no KV cache"):
        model(idx, cache=KVCache(2), doc_ids=torch.zeros(1, 4, dtype=torch.long))
    flash = Llama(LlamaConfig(vocab_size=32, n_layer=1, n_embd=32, attention="flash"))
    with pytest.raises(InputError, match="takes no attention mask"):
        flash(idx, doc_ids=torch.zeros(1, 4, dtype=torch.long))
