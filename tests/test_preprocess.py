"""minillm.preprocess against scipy, numpy, pandas, NLTK and hand-computed cases, and bad input.

Float comparisons use atol 1e-12 where both sides compute the same formula in float64, looser
where a statistic is estimated (MinHash).
"""

import time

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.ndimage import gaussian_filter1d

from minillm import preprocess as pp
from minillm.data import load_text
from minillm.errors import InputError, InputTypeError, MiniLLMError

F64 = {"atol": 1e-12, "rtol": 0.0}
SEED_LIST = [10, 12, 12, 13, 12, 100]  # seed 004's example (erratum 1)


def random_series(n=50, seed=0):
    return np.random.default_rng(seed).normal(5.0, 2.0, size=n)


# --- outliers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ddof", [0, 1])
def test_zscore_matches_scipy(ddof):
    x = random_series()
    np.testing.assert_allclose(pp.zscore(x, ddof=ddof), stats.zscore(x, ddof=ddof), **F64)


def test_erratum_1_zscore_cannot_flag_100_in_the_seed_list():
    z = pp.zscore(SEED_LIST)
    assert abs(z[-1]) == pytest.approx(2.2352, abs=1e-4)
    assert pp.max_abs_zscore(len(SEED_LIST)) == pytest.approx(2.2361, abs=1e-4)
    assert abs(z[-1]) < pp.max_abs_zscore(6) < 3
    assert not pp.zscore_outliers(SEED_LIST, threshold=3).any()


@pytest.mark.parametrize(("ddof", "expected"), [(0, np.sqrt(5)), (1, 5 / np.sqrt(6))])
def test_max_abs_zscore_is_reached_by_one_value_apart_from_equal_others(ddof, expected):
    extreme = [0.0] * 5 + [1.0]
    assert pp.max_abs_zscore(6, ddof=ddof) == pytest.approx(expected, abs=1e-12)
    assert abs(stats.zscore(extreme, ddof=ddof)[-1]) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("ddof", [0, 1])
def test_no_sample_exceeds_the_zscore_bound(ddof):
    rng = np.random.default_rng(1)
    for n in (2, 3, 6, 20):
        samples = rng.standard_cauchy((500, n))  # heavy tails: extreme values are common
        worst = np.abs(stats.zscore(samples, axis=1, ddof=ddof)).max()
        assert worst <= pp.max_abs_zscore(n, ddof=ddof) + 1e-12


def test_iqr_fences_match_numpy_percentiles_and_pandas_quantiles():
    x = random_series(37)
    q1, q3 = np.percentile(x, [25, 75])
    low, high = pp.iqr_fences(x, k=2.0)
    assert (low, high) == pytest.approx((q1 - 2 * (q3 - q1), q3 + 2 * (q3 - q1)), abs=1e-12)
    s = pd.Series(x)
    pandas_q1, pandas_q3 = s.quantile(0.25), s.quantile(0.75)
    assert low == pytest.approx(pandas_q1 - 2 * (pandas_q3 - pandas_q1), abs=1e-12)


def test_iqr_flags_100_in_the_seed_list_and_also_10():
    # Sorted: 10 12 12 12 13 100; Q1 = 12, Q3 = 12 + 0.75 * (13 - 12) = 12.75, IQR = 0.75.
    assert pp.iqr_fences(SEED_LIST) == pytest.approx((10.875, 13.875), abs=1e-12)
    assert pp.iqr_outliers(SEED_LIST).tolist() == [True, False, False, False, False, True]


def test_modified_zscore_by_hand_and_against_scipy_mad():
    # median 12, |x - 12| = 2 0 0 1 0 88, MAD = 0.5
    expected = 0.6745 * (np.array(SEED_LIST) - 12) / 0.5
    np.testing.assert_allclose(pp.modified_zscore(SEED_LIST), expected, **F64)
    x = random_series()
    reference = 0.6745 * (x - np.median(x)) / stats.median_abs_deviation(x)
    np.testing.assert_allclose(pp.modified_zscore(x), reference, **F64)


def test_modified_zscore_flags_only_100_in_the_seed_list():
    assert pp.modified_zscore_outliers(SEED_LIST).tolist() == [False] * 5 + [True]


@pytest.mark.parametrize(
    "call",
    [
        lambda: pp.zscore([3, 3, 3]),
        lambda: pp.zscore([0.1] * 7),
        lambda: pp.modified_zscore([1, 5, 5, 5, 9]),
        lambda: pp.zscore([1.0], ddof=1),
        lambda: pp.zscore([1, 2], ddof=2),
        lambda: pp.max_abs_zscore(1),
        lambda: pp.zscore_outliers([1, 2, 3], threshold=0),
    ],
)
def test_undefined_scores_raise_a_clear_error(call):
    with pytest.raises(InputError):
        call()


def test_max_abs_zscore_rejects_a_fractional_n():
    with pytest.raises(InputTypeError):
        pp.max_abs_zscore(5.5)


NUMERIC_FUNCTIONS = [
    pp.zscore,
    pp.zscore_outliers,
    pp.iqr_fences,
    pp.iqr_outliers,
    pp.modified_zscore,
    pp.modified_zscore_outliers,
    lambda x: pp.moving_average(x, 1),
    lambda x: pp.gaussian_smooth(x, 1.0),
]


@pytest.mark.parametrize("fn", NUMERIC_FUNCTIONS)
@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ([], InputError),
        ([1.0, float("nan"), 2.0], InputError),
        ([1.0, float("inf")], InputError),
        ("1 2 3", InputTypeError),
        ([1, "two", 3], InputTypeError),
        ([[1, 2], [3, 4]], InputError),
    ],
)
def test_numeric_functions_reject_bad_arrays(fn, bad, error):
    with pytest.raises(error):
        fn(bad)


# --- smoothing --------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 2, 3, 4, 7, 12])
def test_moving_average_matches_pandas_centred_rolling(window):
    x = random_series(12)
    reference = pd.Series(x).rolling(window, center=True, min_periods=1).mean().to_numpy()
    np.testing.assert_allclose(pp.moving_average(x, window), reference, **F64)


def test_moving_average_by_hand_averages_only_existing_values_at_the_edges():
    np.testing.assert_allclose(pp.moving_average([1, 2, 3, 4, 5], 3), [1.5, 2, 3, 4, 4.5], **F64)
    np.testing.assert_allclose(pp.moving_average([7.0] * 6, 5), [7.0] * 6, **F64)


@pytest.mark.parametrize(
    ("window", "error"),
    [(6, InputError), (0, InputError), (2.5, InputTypeError), ("3", InputTypeError)],
)
def test_moving_average_rejects_bad_windows(window, error):
    with pytest.raises(error):
        pp.moving_average([1, 2, 3, 4, 5], window)


@pytest.mark.parametrize(("sigma", "truncate"), [(0.5, 4.0), (1.0, 4.0), (2.3, 3.0), (3.0, 1.0)])
def test_gaussian_kernel_is_scipys_impulse_response(sigma, truncate):
    kernel = pp.gaussian_kernel(sigma, truncate)
    radius = int(truncate * sigma + 0.5)
    assert kernel.shape == (2 * radius + 1,)
    impulse = np.zeros(4 * radius + 3)
    impulse[2 * radius + 1] = 1.0
    response = gaussian_filter1d(impulse, sigma, mode="constant", truncate=truncate)
    np.testing.assert_allclose(kernel, response[radius + 1 : 3 * radius + 2], **F64)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("mode", pp.GAUSSIAN_EDGE_MODES)
def test_gaussian_smooth_matches_scipy(mode):
    x = random_series(30)
    reference = gaussian_filter1d(x, 1.7, mode=mode)
    np.testing.assert_allclose(pp.gaussian_smooth(x, 1.7, mode=mode), reference, **F64)


def test_smoothing_a_spike_spreads_it_and_keeps_its_area():
    spike = np.zeros(41)
    spike[20] = 10.0
    averaged, blurred = pp.moving_average(spike, 5), pp.gaussian_smooth(spike, 2.0)
    assert averaged.max() == pytest.approx(2.0) and averaged.sum() == pytest.approx(10.0)
    assert blurred.max() == pytest.approx(10 / np.sqrt(2 * np.pi * 4), rel=1e-3)
    assert blurred.sum() == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"sigma": 0}, InputError),
        ({"sigma": -1}, InputError),
        ({"sigma": 1, "mode": "zero"}, InputError),
    ],
)
def test_gaussian_smooth_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error):
        pp.gaussian_smooth([1, 2, 3], **kwargs)


# --- text normalisation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "form", "expected"),
    [
        ("ﬁne", "NFKC", "fine"),
        ("ＡＢＣ１２", "NFKC", "ABC12"),
        ("x²", "NFKC", "x2"),
        ("a\u00a0b", "NFKC", "a b"),
        ("e\u0301", "NFC", "é"),
        ("ﬁ", "NFC", "ﬁ"),
        ("é", "NFD", "e\u0301"),
    ],
)
def test_normalize_unicode(text, form, expected):
    assert pp.normalize_unicode(text, form) == expected


def test_remove_special_characters():
    assert pp.remove_special_characters("a\tb\nc") == "a b c"
    assert (
        pp.remove_special_characters("zero\u200bwidth soft\u00adhyphen\ufeff")
        == "zerowidth softhyphen"
    )
    assert pp.remove_special_characters("I ❤ it 🙂 © ™") == "I  it   "
    assert pp.remove_special_characters("cost: $5 + 3 < 9") == "cost: $5 + 3 < 9"
    assert pp.remove_special_characters("line\nnext\t!", keep="\n") == "line\nnext !"


def test_remove_punctuation_replaces_ascii_and_typographic_marks_by_spaces():
    assert pp.remove_punctuation("“Hi”—she said… ‘ok’!") == " Hi  she said   ok  "
    assert pp.remove_punctuation("end.Next well-known") == "end Next well known"
    assert pp.remove_punctuation("don't stop!", keep="'") == "don't stop "


def test_collapse_whitespace():
    assert pp.collapse_whitespace("  a \t b\u3000\n\n c  ") == "a b c"
    assert pp.collapse_whitespace("  a \t b \n \n\n c ", keep_newlines=True) == "a b\nc"


def test_expand_abbreviations_whole_words_keeping_a_capital():
    assert (
        pp.expand_abbreviations("Don't panic, e.g. breathe.")
        == "Do not panic, for example breathe."
    )
    assert pp.expand_abbreviations("I’m here") == "I am here"  # typographic apostrophe
    assert pp.expand_abbreviations("they're, etc. vs. them") == "they are, et cetera versus them"
    assert pp.expand_abbreviations("canvs. isn'ty") == "canvs. isn'ty"  # not whole words


def test_maps_are_overridable():
    assert pp.expand_abbreviations("asap, e.g.", {"asap": "as soon as possible"}) == (
        "as soon as possible, e.g."
    )
    assert pp.normalize_spelling("color", {"color": "colour"}) == "colour"
    assert pp.expand_abbreviations("e.g.", {}) == "e.g."


def test_normalize_spelling_whole_words():
    assert pp.normalize_spelling("My favourite Colour, teh end") == "My favorite Color, the end"
    assert pp.normalize_spelling("colours tehran") == "colours tehran"


def test_normalize_text_runs_every_step_in_order():
    text = "  The ﬁrst   COLOUR,\te.g. “red”!\u200b  Don’t  "
    assert pp.normalize_text(text) == "the first color for example red do not"
    assert pp.normalize_text(text, lowercase=False, abbreviations=None, spellings=None) == (
        "The first COLOUR e g red Don t"
    )
    assert pp.normalize_text("Hello, World!", punctuation=False) == "hello, world!"


TEXT_FUNCTIONS = [
    pp.normalize_unicode,
    pp.remove_special_characters,
    pp.remove_punctuation,
    pp.collapse_whitespace,
    pp.expand_abbreviations,
    pp.normalize_spelling,
    pp.normalize_text,
    pp.tokenize_words,
    pp.guess_pos,
    pp.split_documents,
    pp.shingles,
    pp.dedup_key,
    pp.tidy_document,
]


@pytest.mark.parametrize("fn", TEXT_FUNCTIONS)
@pytest.mark.parametrize("bad", [123, None, b"bytes", ["a list"]])
def test_text_functions_reject_non_text(fn, bad):
    with pytest.raises(InputTypeError):
        fn(bad)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(InputError, match="NFC, NFD, NFKC, NFKD"):
        pp.normalize_unicode("x", "NFX")
    with pytest.raises(InputError, match="nltk, treebank, wordpunct, words"):
        pp.tokenize_words("x", "punkt")
    with pytest.raises(InputError, match="lancaster, porter, snowball"):
        pp.stem(["x"], "krovetz")


# --- words ------------------------------------------------------------------------------------

SENTENCE = "Mr. O'Neil's cats aren't running—are they?"


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("nltk", ["Mr.", "O'Neil", "'s", "cats", "are", "n't", "running", "—", "are", "they", "?"]),
        ("treebank", ["Mr.", "O'Neil", "'s", "cats", "are", "n't", "running—are", "they", "?"]),
        (
            "wordpunct",
            [
                "Mr",
                ".",
                "O",
                "'",
                "Neil",
                "'",
                "s",
                "cats",
                "aren",
                "'",
                "t",
                "running",
                "—",
                "are",
                "they",
                "?",
            ],
        ),
        ("words", ["Mr", "O'Neil's", "cats", "aren't", "running", "are", "they"]),
    ],
)
def test_tokenize_words(method, expected):
    assert pp.tokenize_words(SENTENCE, method) == expected


def test_treebank_tokenizers_split_only_the_final_period_without_a_sentence_model():
    assert pp.tokenize_words("It ran. It stopped.") == ["It", "ran.", "It", "stopped", "."]


def test_stemmers_by_hand():
    words = ["running", "studies", "generously", "fairly", "cats", "was"]
    assert pp.stem(words) == ["run", "studi", "gener", "fairli", "cat", "wa"]
    assert pp.stem(words, "snowball") == ["run", "studi", "generous", "fair", "cat", "was"]
    assert pp.stem(["The"]) == ["the"]


def test_stem_rejects_a_bare_string_and_non_text_tokens():
    with pytest.raises(InputTypeError):
        pp.stem("running")
    with pytest.raises(InputTypeError):
        pp.stem(["ok", 3])


@pytest.mark.parametrize(
    ("word", "pos"),
    [
        ("was", "v"),
        ("running", "v"),
        ("quickly", "r"),
        ("famous", "a"),
        ("cats", "n"),
        ("sing", "n"),
        ("red", "n"),
    ],
)
def test_guess_pos(word, pos):
    assert pp.guess_pos(word) == pos


def test_lemmatize_without_and_with_part_of_speech():
    tokens = ["cats", "running", "better", "was", "geese", "studies"]
    assert pp.lemmatize(tokens) == ["cat", "running", "better", "wa", "goose", "study"]
    assert pp.lemmatize(tokens, "guess") == ["cat", "run", "better", "be", "goose", "study"]
    assert pp.lemmatize(tokens, ["n", "v", "a", "v", "n", "v"]) == [
        "cat",
        "run",
        "good",
        "be",
        "goose",
        "study",
    ]
    assert pp.lemmatize(["running"], "v") == ["run"]


@pytest.mark.parametrize(
    ("pos", "error"),
    [("x", InputError), (["n"], InputError), (["n", "q"], InputError), (["n", 1], InputTypeError)],
)
def test_lemmatize_rejects_bad_parts_of_speech(pos, error):
    with pytest.raises(error):
        pp.lemmatize(["cats", "ran"], pos)


def test_lemmatize_names_the_setup_step_when_wordnet_is_missing(monkeypatch):
    import minillm.wordnet

    monkeypatch.setattr(minillm.wordnet, "wordnet_status", lambda: None)
    with pytest.raises(MiniLLMError, match="minillm setup-nltk"):
        pp.lemmatize(["cats"])


# --- missing values ---------------------------------------------------------------------------


@pytest.fixture
def table():
    return pd.DataFrame(
        {
            "a": [1.0, np.nan, 3.0, 4.0, np.nan],
            "b": [10.0, 20.0, 30.0, 40.0, 50.0],
            "c": [np.nan, np.nan, np.nan, 7.0, np.nan],
        }
    )


def test_drop_missing_rows_and_columns_match_pandas(table):
    pd.testing.assert_frame_equal(pp.drop_missing(table), table.dropna())
    pd.testing.assert_frame_equal(pp.drop_missing(table, axis="columns"), table.dropna(axis=1))
    # Column c is 80 % missing, a is 40 %: a cap of 50 % keeps a and b.
    assert list(pp.drop_missing(table, axis="columns", max_missing=0.5).columns) == ["a", "b"]
    # Rows 1 and 4 miss 2 of 3 values, row 0 one of 3.
    assert list(pp.drop_missing(table, max_missing=0.5).index) == [0, 2, 3]
    series = table["a"]
    pd.testing.assert_series_equal(pp.drop_missing(series), series.dropna())


def test_fill_mean_median_constant_by_hand(table):
    a = table[["a"]]
    assert pp.fill_missing(a, "mean")["a"].tolist() == pytest.approx([1, 8 / 3, 3, 4, 8 / 3])
    assert pp.fill_missing(a, "median")["a"].tolist() == [1, 3, 3, 4, 3]
    assert pp.fill_missing(table["a"], "constant", value=0).tolist() == [1, 0, 3, 4, 0]
    words = pd.Series(["x", None, "y"])
    assert pp.fill_missing(words, "constant", value="unknown").tolist() == ["x", "unknown", "y"]


def test_linear_fill_interpolates_inside_and_takes_the_nearest_value_at_the_edges():
    s = pd.Series([np.nan, 1.0, np.nan, np.nan, 4.0, np.nan])
    assert pp.fill_missing(s, "linear").tolist() == [1.0, 1.0, 2.0, 3.0, 4.0, 4.0]
    np.testing.assert_allclose(
        pp.fill_missing(s, "linear").to_numpy(),
        np.interp(np.arange(6), [1, 4], [1.0, 4.0]),  # np.interp holds the end values
        **F64,
    )


def test_fill_leaves_the_input_unchanged(table):
    before = table.copy()
    pp.fill_missing(table, "mean")
    pp.regression_impute(table[["a", "b"]])
    pd.testing.assert_frame_equal(table, before)


def test_regression_impute_recovers_an_exact_linear_relation():
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=20), rng.normal(size=20)
    truth = 2 * x1 - 3 * x2 + 5
    y = truth.copy()
    y[[2, 7, 11]] = np.nan
    df = pd.DataFrame({"x1": x1, "x2": x2, "y": y})
    imputed = pp.regression_impute(df)
    np.testing.assert_allclose(imputed["y"].to_numpy(), truth, atol=1e-10, rtol=0)
    pd.testing.assert_frame_equal(imputed[["x1", "x2"]], df[["x1", "x2"]])


def test_regression_impute_with_one_predictor_matches_numpy_polyfit():
    rng = np.random.default_rng(1)
    x = rng.normal(size=30)
    y = 0.5 * x + rng.normal(scale=0.3, size=30)
    y[[0, 5]] = np.nan
    slope, intercept = np.polyfit(x[~np.isnan(y)], y[~np.isnan(y)], 1)
    imputed = pp.regression_impute(pd.DataFrame({"x": x, "y": y}))
    np.testing.assert_allclose(
        imputed["y"].to_numpy()[[0, 5]], slope * x[[0, 5]] + intercept, atol=1e-10
    )


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda t: pp.fill_missing(t, "mode"), InputError),
        (lambda t: pp.fill_missing(t, "constant"), InputError),
        (lambda t: pp.fill_missing(t.assign(d=["x", None, "y", "z", "w"]), "mean"), InputTypeError),
        (lambda t: pp.fill_missing(t.assign(d=np.nan), "median"), InputError),
        (lambda t: pp.drop_missing(t, axis="diagonal"), InputError),
        (lambda t: pp.drop_missing(t, max_missing=1.0), InputError),
        (lambda t: pp.drop_missing(t["a"], axis="columns"), InputError),
        (lambda t: pp.regression_impute(t[["a", "c"]]), InputError),  # no complete column
        # a is known in one row only: too few for an intercept and a slope
        (lambda t: pp.regression_impute(t[["a", "b"]].iloc[:2]), InputError),
        (lambda t: pp.regression_impute(t["a"]), InputTypeError),
        (lambda t: pp.fill_missing(t.to_numpy(), "mean"), InputTypeError),
        (lambda t: pp.fill_missing(t.iloc[:0], "mean"), InputError),
    ],
)
def test_missing_value_functions_reject_bad_input(table, call, error):
    with pytest.raises(error):
        call(table)


# --- corpus cleaning --------------------------------------------------------------------------


def test_split_documents_at_blank_lines():
    text = "A:\nhello\n\nB:\nbye\n  \t\nC:\nok\n\n\n"
    assert pp.split_documents(text) == ["A:\nhello", "B:\nbye", "C:\nok"]


def test_shingles_and_jaccard_by_hand():
    assert pp.shingles("abcde", 3) == {"abc", "bcd", "cde"}
    assert pp.shingles("ab", 3) == {"ab"}
    assert pp.shingles("to be or not to be", 2, unit="word") == {
        "to be",
        "be or",
        "or not",
        "not to",
    }
    assert pp.jaccard({"a", "b", "c"}, {"b", "c", "d"}) == 0.5
    assert pp.jaccard(set(), set()) == 1.0
    with pytest.raises(InputError):
        pp.shingles("abc", 2, unit="byte")
    with pytest.raises(InputTypeError):
        pp.jaccard(["a"], {"a"})


def test_minhash_agreement_estimates_jaccard():
    a = {str(i) for i in range(100)}
    b = {str(i) for i in range(50, 150)}  # Jaccard 50 / 150
    sig_a, sig_b = pp.minhash_signature(a, 512), pp.minhash_signature(b, 512)
    assert sig_a.shape == (512,)
    assert np.mean(sig_a == sig_b) == pytest.approx(1 / 3, abs=0.07)
    np.testing.assert_array_equal(pp.minhash_signature(a, 512), sig_a)  # deterministic
    with pytest.raises(InputError):
        pp.minhash_signature(set())
    with pytest.raises(InputTypeError):
        pp.minhash_signature(["abc"])


HAND_MADE_CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",  # kept
    "THE QUICK brown fox jumps over the lazy dog, near the river bank!",  # exact dup of 0 (key)
    "The quick brown fox jumps over the lazy dog near the river banks.",  # near dup of 0
    "Too short here.",
    "   \t  ",  # empty once tidied
    "$$$ ### 123 456 789 @@@ !!! *** %%% ^^^",  # mostly symbols
    "a b c d e f g h i j k l",  # words far too short on average
    "Buy now!\nBuy now!\nBuy now!\nBest prices on everything today.",  # repeated lines
    "A completely different sentence about weather and the coming spring rain.",  # kept
]


def test_clean_corpus_on_a_hand_made_corpus_removes_the_known_problems():
    result = pp.clean_corpus(HAND_MADE_CORPUS)
    assert result.documents == [HAND_MADE_CORPUS[0], HAND_MADE_CORPUS[8]]
    assert result.removed == {
        "empty": 1,
        "too_short": 1,
        "too_long": 0,
        "low_alpha": 1,
        "odd_word_length": 1,
        "repeated_lines": 1,
        "exact_duplicate": 1,
        "near_duplicate": 1,
    }
    assert dict(result.rejected)["near_duplicate"] == HAND_MADE_CORPUS[2]


def test_clean_corpus_keeps_the_first_duplicate_and_tidies_what_it_keeps():
    docs = ["second\u00a0copy  of the very same   line", "Second copy of the very same line!"]
    result = pp.clean_corpus(docs)
    assert result.documents == ["second copy of the very same line"]
    assert result.rejected == [("exact_duplicate", docs[1])]


def test_clean_corpus_splits_a_single_text_and_can_turn_near_dedup_off():
    text = "one two three four five six\n\none two three four five sixx"
    assert pp.clean_corpus(text).removed["near_duplicate"] == 1
    loose = pp.CleaningConfig(near_duplicate_jaccard=1.0)
    assert len(pp.clean_corpus(text, loose).documents) == 2


@pytest.mark.parametrize(
    "config",
    [
        pp.CleaningConfig(min_words=0),
        pp.CleaningConfig(min_words=10, max_words=5),
        pp.CleaningConfig(num_perm=60, bands=16),
        pp.CleaningConfig(near_duplicate_jaccard=0.0),
    ],
)
def test_clean_corpus_rejects_bad_configs(config):
    with pytest.raises(InputError):
        pp.clean_corpus(["some text"], config)


def test_clean_corpus_rejects_non_text():
    with pytest.raises(InputTypeError):
        pp.clean_corpus(["fine", 42])
    with pytest.raises(InputTypeError):
        pp.clean_corpus(None)


def test_clean_corpus_on_tiny_shakespeare_accounts_for_every_speech():
    documents = pp.split_documents(load_text("tinyshakespeare", progress=False))
    start = time.perf_counter()
    result = pp.clean_corpus(documents)
    seconds = time.perf_counter() - start
    assert len(result.documents) + sum(result.removed.values()) == len(documents) == 7222
    keys = [pp.dedup_key(doc) for doc in result.documents]
    assert len(set(keys)) == len(keys)
    assert result.removed["too_short"] > 0 and result.removed["exact_duplicate"] > 0
    assert seconds < 30, f"cleaning took {seconds:.1f} s; it should take a few"
