"""Chapter 01: cleaning data before a model sees it.

The module follows the chapter, top to bottom:

1. numeric noise: outlier masks (z-score, IQR fences, modified z-score) and smoothing (centred
   moving average, Gaussian filter);
2. text: Unicode, case, special characters, punctuation, whitespace, abbreviations and spelling;
   then words: tokenising, stemming and lemmatising with NLTK;
3. missing values in pandas tables: drop, fill with a statistic or a constant, interpolate,
   impute by regression;
4. the same ideas at LLM scale: `clean_corpus` normalises, filters and de-duplicates a corpus and
   says how many documents each step removed.

Numeric functions take a 1-D sequence of numbers and return float64 arrays of the same length,
shape (n,) -> (n,). Text functions take and return `str`. Bad input raises a
`minillm.errors.MiniLLMError` that says what is wrong.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter1d

from minillm.errors import (
    InputError,
    InputTypeError,
    as_float_array,
    require_positive,
    require_text,
    require_texts,
    unknown_name,
)
from minillm.wordnet import require_wordnet

# ---------------------------------------------------------------------------------------------
# 1a. Outliers
# ---------------------------------------------------------------------------------------------

# Converts a MAD into a standard deviation for normal data: the MAD of N(0, 1) is the 75th
# percentile of |z|, Phi^-1(0.75) = 0.6745 (Iglewicz and Hoaglin, 1993).
MAD_TO_STD = 0.6745


def _require_ddof(ddof: int) -> int:
    if ddof not in (0, 1):
        raise InputError(f"ddof must be 0 (population std) or 1 (sample std), got {ddof!r}")
    return ddof


def _require_spread(arr: np.ndarray) -> None:
    # ptp, not std == 0: the mean of equal floats can be off by an ulp, giving a std of 1e-17.
    if np.ptp(arr) == 0:
        raise InputError("all values of x are equal, so the std is 0 and z-scores are 0/0")


def zscore(x: Sequence[float], *, ddof: int = 0) -> np.ndarray:
    """Standard scores (x - mean) / std, shape (n,) -> (n,).

    `ddof=0` divides the variance by n (population std, `scipy.stats.zscore`'s default);
    `ddof=1` divides by n - 1 (sample std, pandas' default), which gives slightly smaller |z|.

    >>> zscore([1, 2, 3])
    array([-1.22474487,  0.        ,  1.22474487])
    """
    arr = as_float_array(x, "x", min_size=_require_ddof(ddof) + 1)
    _require_spread(arr)
    return (arr - arr.mean()) / arr.std(ddof=ddof)


def zscore_outliers(x: Sequence[float], threshold: float = 3.0, *, ddof: int = 0) -> np.ndarray:
    """Boolean mask (n,) of the values with |z| > `threshold`.

    In a sample of n values no |z| can exceed `max_abs_zscore(n)`, so a threshold above that
    bound flags nothing, however extreme a value is (six values and threshold 3, for instance).
    """
    require_positive(threshold, "threshold")
    return np.abs(zscore(x, ddof=ddof)) > threshold


def max_abs_zscore(n: int, *, ddof: int = 0) -> float:
    """The largest |z| any sample of `n` values can have (Samuelson's inequality).

    One value far from n - 1 equal others reaches it: sqrt(n - 1) with the population std
    (`ddof=0`), (n - 1) / sqrt(n) with the sample std (`ddof=1`).

    >>> round(max_abs_zscore(6), 4)
    2.2361
    """
    require_positive(n, "n", integer=True)
    if n < 2:
        raise InputError(f"a z-score needs at least 2 values, got n={n}")
    return math.sqrt(n - 1) if _require_ddof(ddof) == 0 else (n - 1) / math.sqrt(n)


def iqr_fences(x: Sequence[float], k: float = 1.5) -> tuple[float, float]:
    """Tukey's fences (Q1 - k*IQR, Q3 + k*IQR), with quartiles by linear interpolation.

    The quartiles are `np.percentile(x, [25, 75])` (numpy's and pandas' default method).
    """
    arr = as_float_array(x, "x")
    require_positive(k, "k")
    q1, q3 = np.percentile(arr, [25, 75])
    return float(q1 - k * (q3 - q1)), float(q3 + k * (q3 - q1))


def iqr_outliers(x: Sequence[float], k: float = 1.5) -> np.ndarray:
    """Boolean mask (n,) of the values outside `iqr_fences(x, k)`."""
    arr = as_float_array(x, "x")
    low, high = iqr_fences(arr, k)
    return (arr < low) | (arr > high)


def modified_zscore(x: Sequence[float]) -> np.ndarray:
    """Robust scores 0.6745 * (x - median) / MAD, shape (n,) -> (n,).

    MAD is the median of |x - median|. Median and MAD ignore how extreme the extremes are, so one
    wild value cannot hide itself by inflating the spread as it does with mean and std.
    Undefined when MAD = 0, which happens when about half the values or more equal the median.
    """
    arr = as_float_array(x, "x")
    median = np.median(arr)
    mad = np.median(np.abs(arr - median))
    if mad == 0:
        raise InputError(
            "the MAD of x is 0 (most of its values equal the median), so modified z-scores "
            "divide by 0; use iqr_outliers instead"
        )
    return MAD_TO_STD * (arr - median) / mad


def modified_zscore_outliers(x: Sequence[float], threshold: float = 3.5) -> np.ndarray:
    """Boolean mask (n,) of the values with |modified z| > `threshold` (3.5 is the usual cut)."""
    require_positive(threshold, "threshold")
    return np.abs(modified_zscore(x)) > threshold


# ---------------------------------------------------------------------------------------------
# 1b. Smoothing
# ---------------------------------------------------------------------------------------------

GAUSSIAN_EDGE_MODES = ("reflect", "nearest", "mirror", "constant", "wrap")


def moving_average(x: Sequence[float], window: int) -> np.ndarray:
    """Centred moving average, shape (n,) -> (n,).

    Each value becomes the mean of the `window` values around it. Near the ends, where part of
    the window falls outside the series, it is the mean of the values that exist: no zero padding
    (which would drag the ends towards 0) and no NaN. An even window takes one more value before
    the point than after. Same as `pd.Series(x).rolling(window, center=True,
    min_periods=1).mean()`.

    >>> moving_average([0, 0, 3, 0, 0], 3)
    array([0., 1., 1., 1., 0.])
    """
    arr = as_float_array(x, "x")
    require_positive(window, "window", integer=True)
    if window > arr.size:
        raise InputError(f"window={window} is longer than the series ({arr.size} values)")
    return pd.Series(arr).rolling(int(window), center=True, min_periods=1).mean().to_numpy()


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Normalised Gaussian weights, shape (2r + 1,) with radius r = int(truncate * sigma + 0.5).

    These are the weights `scipy.ndimage.gaussian_filter1d` uses: exp(-t^2 / (2 sigma^2)) for
    t = -r..r, divided by their sum so that smoothing keeps the mean of a flat series.
    """
    require_positive(sigma, "sigma")
    require_positive(truncate, "truncate")
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (t / sigma) ** 2)
    return weights / weights.sum()


def gaussian_smooth(
    x: Sequence[float], sigma: float, *, truncate: float = 4.0, mode: str = "reflect"
) -> np.ndarray:
    """Gaussian smoothing, shape (n,) -> (n,): `scipy.ndimage.gaussian_filter1d`.

    Each value becomes a weighted mean of its neighbours with `gaussian_kernel(sigma)` weights,
    so near values count more than far ones (a moving average weighs its window equally).
    `mode` says how the series is extended past its ends: "reflect" mirrors it (d c b a | a b c
    d | d c b a), "constant" pads with zeros.
    """
    arr = as_float_array(x, "x")
    require_positive(sigma, "sigma")
    require_positive(truncate, "truncate")
    if mode not in GAUSSIAN_EDGE_MODES:
        raise unknown_name("edge mode", mode, GAUSSIAN_EDGE_MODES)
    return gaussian_filter1d(arr, float(sigma), mode=mode, truncate=float(truncate))


# ---------------------------------------------------------------------------------------------
# 2a. Text normalisation
# ---------------------------------------------------------------------------------------------

UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")

# Small on purpose: a real project grows its own maps from its own data. Keys are matched as
# whole words, ignoring case; an apostrophe in a key also matches a typographic one (’).
ABBREVIATIONS: dict[str, str] = {
    "e.g.": "for example",
    "i.e.": "that is",
    "etc.": "et cetera",
    "vs.": "versus",
    "approx.": "approximately",
    "dr.": "doctor",
    "can't": "cannot",
    "won't": "will not",
    "don't": "do not",
    "doesn't": "does not",
    "isn't": "is not",
    "it's": "it is",
    "i'm": "i am",
    "you're": "you are",
    "they're": "they are",
    "we've": "we have",
}

# One spelling per word: British to American (a choice, either is fine if it is consistent)
# and a few common misspellings.
SPELLINGS: dict[str, str] = {
    "colour": "color",
    "favourite": "favorite",
    "organise": "organize",
    "centre": "center",
    "recieve": "receive",
    "seperate": "separate",
    "definately": "definitely",
    "occured": "occurred",
    "untill": "until",
    "teh": "the",
}


def normalize_unicode(text: str, form: str = "NFKC") -> str:
    """Unicode normalisation: one code-point sequence for what reads as the same text.

    NFKC (the default) also folds compatibility characters: "ﬁ" -> "fi", full-width "Ａ" -> "A",
    "²" -> "2", a no-break space -> " ". NFC only composes ("e" + combining acute -> "é").
    """
    require_text(text)
    if form not in UNICODE_FORMS:
        raise unknown_name("Unicode normal form", form, UNICODE_FORMS)
    return unicodedata.normalize(form, text)


# What happens to each Unicode category counted as special: control characters (tab, newline,
# carriage return) separate words, so they become a space; format characters (zero-width space,
# soft hyphen, byte-order mark) sit inside words, so they go; and so do symbols such as emoji,
# ©, ™, arrows (So), modifier symbols such as ^ and ` (Sk), private-use, surrogate and unassigned
# code points. Maths (+ = <) and currency ($ €) symbols are kept: they carry meaning.
_SPECIAL_CATEGORY_REPLACEMENT = {"Cc": " "} | dict.fromkeys(
    ("Cf", "Co", "Cs", "Cn", "So", "Sk"), ""
)


def _translate_by_category(text: str, replacement_of: Mapping[str, str], keep: str) -> str:
    # Look each distinct character up once, then rewrite the text in one C-level pass: fast
    # enough for a whole corpus.
    table = {
        ord(ch): replacement_of[cat]
        for ch in set(text)
        if ch not in keep and (cat := unicodedata.category(ch)) in replacement_of
    }
    return text.translate(table)


def remove_special_characters(text: str, *, keep: str = "") -> str:
    """Replace control characters by a space and drop invisible format characters and symbols.

    Characters in `keep` are left alone (`keep="\\n"` keeps line breaks).

    >>> remove_special_characters("tab\\there\\u200b! 🙂 ©2024")
    'tab here!  2024'
    """
    require_text(text)
    require_text(keep, "keep")
    return _translate_by_category(text, _SPECIAL_CATEGORY_REPLACEMENT, keep)


_PUNCTUATION_CATEGORIES = ("Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po")


def remove_punctuation(text: str, *, keep: str = "") -> str:
    """Replace every punctuation character (Unicode category P*) by a space.

    A space rather than nothing, so that "end.Next" and "well-known" still split into two words;
    `collapse_whitespace` tidies the extra spaces. Covers typographic quotes and dashes (“ ” ‘ ’
    — …), which `string.punctuation` misses. Characters in `keep` are left alone.
    """
    require_text(text)
    require_text(keep, "keep")
    return _translate_by_category(text, dict.fromkeys(_PUNCTUATION_CATEGORIES, " "), keep)


def collapse_whitespace(text: str, *, keep_newlines: bool = False) -> str:
    """Turn every run of whitespace into one space and strip both ends.

    With `keep_newlines`, each line is collapsed on its own and blank lines are dropped, so the
    result keeps its line structure: "  a \\t b \\n\\n c " -> "a b\\nc".
    """
    require_text(text)
    if not keep_newlines:
        return " ".join(text.split())
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "\n".join(line for line in lines if line)


@lru_cache(maxsize=32)
def _whole_word_pattern(keys: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first, so that a key never loses to a shorter key it starts with.
    alternatives = sorted((re.escape(k).replace("'", "['’]") for k in keys), key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def _replace_whole_words(text: str, mapping: Mapping[str, str]) -> str:
    lookup = {k.lower().replace("’", "'"): v for k, v in mapping.items()}
    if not lookup:
        return text

    def replace(match: re.Match[str]) -> str:
        found = match.group(0)
        new = lookup[found.lower().replace("’", "'")]
        return new[:1].upper() + new[1:] if found[:1].isupper() else new

    return _whole_word_pattern(tuple(lookup)).sub(replace, text)


def expand_abbreviations(text: str, mapping: Mapping[str, str] | None = None) -> str:
    """Expand abbreviations and contractions found in `mapping` (default `ABBREVIATIONS`).

    Whole words only, ignoring case; a capitalised match gives a capitalised expansion.

    >>> expand_abbreviations("Don't panic, e.g. breathe.")
    'Do not panic, for example breathe.'
    """
    require_text(text)
    return _replace_whole_words(text, ABBREVIATIONS if mapping is None else mapping)


def normalize_spelling(text: str, mapping: Mapping[str, str] | None = None) -> str:
    """Replace variant spellings found in `mapping` (default `SPELLINGS`), whole words only.

    >>> normalize_spelling("My favourite colour")
    'My favorite color'
    """
    require_text(text)
    return _replace_whole_words(text, SPELLINGS if mapping is None else mapping)


def normalize_text(
    text: str,
    *,
    unicode_form: str | None = "NFKC",
    lowercase: bool = True,
    abbreviations: Mapping[str, str] | None = ABBREVIATIONS,
    spellings: Mapping[str, str] | None = SPELLINGS,
    special_characters: bool = True,
    punctuation: bool = True,
) -> str:
    """All of the above in the order that works: Unicode, special characters, case,
    abbreviations (they contain punctuation, so before it goes), spelling, punctuation, and
    whitespace last (the earlier steps leave extra spaces). Pass None or False to skip a step.

    >>> normalize_text("  The ﬁrst   COLOUR,\\te.g. “red”!  ")
    'the first color for example red'
    """
    require_text(text)
    if unicode_form is not None:
        text = normalize_unicode(text, unicode_form)
    if special_characters:
        text = remove_special_characters(text)
    if lowercase:
        text = text.lower()
    if abbreviations is not None:
        text = expand_abbreviations(text, abbreviations)
    if spellings is not None:
        text = normalize_spelling(text, spellings)
    if punctuation:
        text = remove_punctuation(text)
    return collapse_whitespace(text)


# ---------------------------------------------------------------------------------------------
# 2b. Words: tokenising, stemming, lemmatising
# ---------------------------------------------------------------------------------------------

# None of these needs a downloaded model. `nltk.word_tokenize` is "nltk" after splitting the text
# into sentences with the punkt model; without punkt, the Treebank-style tokenizers split off a
# period only at the very end of the text, so give them one sentence at a time.
# name -> (the NLTK class, its arguments). NLTK takes longer to import than the rest of this
# module (1.5 s here), so the objects are built on first use (`_nltk`): a grade or a notebook that
# needs no tokenizer does not wait for it.
WORD_TOKENIZERS = {
    "nltk": ("nltk.tokenize.NLTKWordTokenizer", ()),  # Treebank rules, improved (quotes, dashes)
    "treebank": ("nltk.tokenize.TreebankWordTokenizer", ()),  # "doesn't" -> "does", "n't"
    "wordpunct": ("nltk.tokenize.WordPunctTokenizer", ()),  # runs of letters/digits, of the rest
    "words": ("nltk.tokenize.RegexpTokenizer", (r"\w+(?:['’]\w+)*",)),  # punctuation dropped
}

STEMMERS = {
    "porter": ("nltk.stem.PorterStemmer", ()),
    "snowball": ("nltk.stem.SnowballStemmer", ("english",)),  # "Porter2": Porter's own revision
    "lancaster": ("nltk.stem.LancasterStemmer", ()),  # the most aggressive
}


@cache
def _nltk(spec: tuple[str, tuple]):
    """The NLTK object that `spec` (a value of WORD_TOKENIZERS or STEMMERS) names, built once."""
    dotted, args = spec
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(*args)


# WordNet's parts of speech: noun, verb, adjective, satellite adjective, adverb.
WORDNET_POS = ("n", "v", "a", "s", "r")


def _require_text_list(values: object, name: str) -> list[str]:
    if not isinstance(values, Iterable):
        raise InputTypeError(f"{name} must be a list of strings, got {type(values).__name__}")
    return require_texts(values, name)


def tokenize_words(text: str, method: str = "nltk") -> list[str]:
    """Split `text` into word tokens with an NLTK tokenizer that needs no downloaded model.

    >>> tokenize_words("The cats aren't running.")
    ['The', 'cats', 'are', "n't", 'running', '.']
    """
    require_text(text)
    if method not in WORD_TOKENIZERS:
        raise unknown_name("tokenizer", method, WORD_TOKENIZERS)
    return _nltk(WORD_TOKENIZERS[method]).tokenize(text)


def stem(tokens: Sequence[str], algorithm: str = "porter") -> list[str]:
    """Stem each token: strip suffixes by rule, without a dictionary, so stems need not be words
    ("studies" -> "studi"). NLTK's stemmers also lower-case."""
    tokens = _require_text_list(tokens, "tokens")
    if algorithm not in STEMMERS:
        raise unknown_name("stemmer", algorithm, STEMMERS)
    stemmer = _nltk(STEMMERS[algorithm])
    return [stemmer.stem(token) for token in tokens]


# Forms of "be", "have" and "do" carry no telling suffix but are among the commonest words.
_AUXILIARY_VERBS = frozenset("am is are was were been being has had having does did done".split())
# Suffix rules, checked in order: crude, but they need no tagger model. A word that no rule
# matches is taken as a noun, WordNet's own default.
_POS_SUFFIXES = (
    ("ly", "r"),
    ("ing", "v"),
    ("ed", "v"),
    ("ize", "v"),
    ("ise", "v"),
    ("ful", "a"),
    ("ous", "a"),
    ("ive", "a"),
    ("able", "a"),
    ("ible", "a"),
    ("less", "a"),
    ("ic", "a"),
)


def guess_pos(word: str) -> str:
    """A WordNet part of speech ("n", "v", "a", "r") guessed from the word alone.

    A stand-in for a real tagger (`nltk.pos_tag` needs a downloaded model): a few auxiliary verbs
    by name, the rest by suffix. Right for "was", "running", "quickly", "famous"; wrong for
    "string" (a noun, not "-ing"), "family" (not "-ly") and any word whose part of speech depends
    on the sentence ("a meeting" versus "meeting her").
    """
    word = require_text(word, "word").lower()
    if word in _AUXILIARY_VERBS:
        return "v"
    for suffix, pos in _POS_SUFFIXES:
        # Three letters of stem at least, so that "red", "sing" and "fly" stay nouns.
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            return pos
    return "n"


def lemmatize(tokens: Sequence[str], pos: str | Sequence[str] | None = None) -> list[str]:
    """Map each token to its dictionary form with NLTK's WordNet lemmatiser.

    `pos` is the part of speech WordNet should assume: None for WordNet's default (noun, so
    "running" stays "running"), one of "n" "v" "a" "s" "r" for every token, "guess" for
    `guess_pos` on each token, or a sequence with one tag per token (from a tagger you trust).
    WordNet looks words up as written; lower-case them first ("Cats" is not found).
    """
    tokens = _require_text_list(tokens, "tokens")
    if pos is None or pos in WORDNET_POS:
        tags = [pos or "n"] * len(tokens)
    elif pos == "guess":
        tags = [guess_pos(token) for token in tokens]
    elif isinstance(pos, str):
        raise unknown_name("part of speech", pos, (*WORDNET_POS, "guess"))
    else:
        tags = _require_text_list(pos, "pos")
        if len(tags) != len(tokens):
            raise InputError(f"pos has {len(tags)} tags for {len(tokens)} tokens")
        for tag in tags:
            if tag not in WORDNET_POS:
                raise unknown_name("part of speech", tag, WORDNET_POS)
    require_wordnet()
    from nltk.stem import WordNetLemmatizer

    lemmatizer = WordNetLemmatizer()
    return [lemmatizer.lemmatize(token, tag) for token, tag in zip(tokens, tags, strict=True)]


# ---------------------------------------------------------------------------------------------
# 3. Missing values
# ---------------------------------------------------------------------------------------------

FILL_METHODS = ("mean", "median", "constant", "linear")


def _require_table(data: object) -> pd.DataFrame | pd.Series:
    if not isinstance(data, (pd.DataFrame, pd.Series)):
        raise InputTypeError(
            f"data must be a pandas DataFrame or Series, got {type(data).__name__}"
        )
    if data.size == 0:
        raise InputError("data is empty")
    return data


def _columns(data: pd.DataFrame | pd.Series) -> list[tuple[object, pd.Series]]:
    return list(data.items()) if isinstance(data, pd.DataFrame) else [(data.name, data)]


def _require_numeric(data: pd.DataFrame | pd.Series, method: str) -> None:
    for name, column in _columns(data):
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            raise InputTypeError(
                f"column {name!r} is not numeric ({column.dtype}); {method} needs numbers, "
                "use method='constant' for other columns"
            )
        if column.isna().all():
            raise InputError(f"column {name!r} has no values to fill from; drop it instead")


def drop_missing(
    data: pd.DataFrame | pd.Series, *, axis: str = "rows", max_missing: float = 0.0
) -> pd.DataFrame | pd.Series:
    """Drop the rows (or columns) in which more than `max_missing` of the values are missing.

    The default 0.0 drops any row with a missing value; `axis="columns", max_missing=0.5`
    drops the columns that are mostly empty.
    """
    data = _require_table(data)
    if axis not in ("rows", "columns"):
        raise unknown_name("axis", axis, ("rows", "columns"))
    if isinstance(data, pd.Series) and axis == "columns":
        raise InputError("a Series has no columns to drop; use axis='rows'")
    if not 0 <= max_missing < 1:
        raise InputError(f"max_missing must be a fraction in [0, 1), got {max_missing!r}")
    if axis == "rows":
        missing = data.isna().mean(axis=1) if isinstance(data, pd.DataFrame) else data.isna()
        return data[missing <= max_missing]
    return data.loc[:, data.isna().mean(axis=0) <= max_missing]


def fill_missing(
    data: pd.DataFrame | pd.Series, method: str, *, value: object = None
) -> pd.DataFrame | pd.Series:
    """Fill missing values column by column; returns a new object.

    - "mean" / "median": the column's statistic (the median resists skew and outliers);
    - "constant": `value` (0, "unknown", ...), for any column type;
    - "linear": straight lines between the neighbouring known values, by position; the missing
      values before the first and after the last known one take the nearest known value.
    """
    data = _require_table(data)
    if method not in FILL_METHODS:
        raise unknown_name("fill method", method, FILL_METHODS)
    if method == "constant":
        if value is None:
            raise InputError("method='constant' needs a value, e.g. value=0")
        return data.fillna(value)
    _require_numeric(data, method)
    if method == "mean":
        return data.fillna(data.mean())
    if method == "median":
        return data.fillna(data.median())
    return data.interpolate(method="linear", limit_direction="both")


def regression_impute(data: pd.DataFrame) -> pd.DataFrame:
    """Predict each column's missing values from the complete columns by least squares.

    For every column with missing values, fit column ~ intercept + (the columns with no missing
    values) on the rows where it is known, and fill the others with the fit's predictions.
    Known values are never changed. Works when columns are correlated; with no complete column
    to predict from, it raises.
    """
    data = _require_table(data)
    if not isinstance(data, pd.DataFrame):
        raise InputTypeError(
            "regression_impute needs a DataFrame: a column is predicted from others"
        )
    _require_numeric(data, "regression")
    complete = [name for name, column in data.items() if column.notna().all()]
    incomplete = [name for name, column in data.items() if column.isna().any()]
    if incomplete and not complete:
        raise InputError("every column has missing values, so there is nothing to regress on")
    design = np.column_stack([np.ones(len(data)), data[complete].to_numpy(np.float64)])
    result = data.copy()
    for name in incomplete:
        known = data[name].notna().to_numpy()
        if known.sum() < design.shape[1]:
            raise InputError(
                f"column {name!r} has {known.sum()} known values, too few to fit "
                f"{design.shape[1]} coefficients"
            )
        target = data[name].to_numpy(np.float64)
        coef, *_ = np.linalg.lstsq(design[known], target[known], rcond=None)
        result.loc[~known, name] = design[~known] @ coef
    return result


# ---------------------------------------------------------------------------------------------
# 4. Cleaning a corpus for LLM training
# ---------------------------------------------------------------------------------------------


def split_documents(text: str) -> list[str]:
    """Split `text` at blank lines (a line holding only whitespace counts as blank).

    In tiny Shakespeare that makes each speech one document.
    """
    require_text(text)
    return [doc for doc in re.split(r"\n[^\S\n]*\n", text) if doc.strip()]


def shingles(text: str, n: int = 5, *, unit: str = "char") -> set[str]:
    """The set of n-grams of characters (`unit="char"`) or of words (`unit="word"`, joined by
    spaces). A text shorter than n is its own single shingle, so no text has an empty set.

    >>> sorted(shingles("abcd", 3))
    ['abc', 'bcd']
    """
    require_text(text)
    require_positive(n, "n", integer=True)
    if unit == "char":
        items: Sequence[str] = text
    elif unit == "word":
        items = text.split()
    else:
        raise unknown_name("shingle unit", unit, ("char", "word"))
    joiner = "" if unit == "char" else " "
    if len(items) < n:
        return {joiner.join(items)}
    return {joiner.join(items[i : i + n]) for i in range(len(items) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    """|a & b| / |a | b|: 1.0 for equal sets, 0.0 for disjoint ones (and 1.0 for two empty sets)."""
    if not isinstance(a, (set, frozenset)) or not isinstance(b, (set, frozenset)):
        raise InputTypeError(
            "jaccard compares two sets, e.g. shingles(text_a) and shingles(text_b)"
        )
    union = len(a | b)
    return len(a & b) / union if union else 1.0


# Universal hashing h(x) = (a x + b) mod p with p the Mersenne prime 2^31 - 1: products of two
# numbers below p stay below 2^62, so uint64 arithmetic never overflows.
_MINHASH_PRIME = np.uint64((1 << 31) - 1)


@lru_cache(maxsize=8)
def _minhash_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, int(_MINHASH_PRIME), size=(num_perm, 1), dtype=np.uint64)
    b = rng.integers(0, int(_MINHASH_PRIME), size=(num_perm, 1), dtype=np.uint64)
    return a, b


def minhash_signature(shingle_set: set[str], num_perm: int = 64, *, seed: int = 0) -> np.ndarray:
    """MinHash signature, shape (num_perm,): for each of `num_perm` random hash functions, the
    smallest hash of any shingle.

    Two sets agree in one position with probability equal to their Jaccard similarity, so the
    fraction of equal positions estimates it without comparing the sets themselves.
    """
    if not isinstance(shingle_set, (set, frozenset)):
        raise InputTypeError(f"shingle_set must be a set, got {type(shingle_set).__name__}")
    if not shingle_set:
        raise InputError("minhash_signature needs at least one shingle")
    require_positive(num_perm, "num_perm", integer=True)
    # crc32, not hash(): Python salts str hashes per process, and signatures must repeat.
    x = np.fromiter(map(zlib.crc32, map(str.encode, shingle_set)), np.uint64, len(shingle_set))
    a, b = _minhash_params(int(num_perm), seed)
    return ((a * (x % _MINHASH_PRIME) + b) % _MINHASH_PRIME).min(axis=1)


@dataclass(frozen=True)
class CleaningConfig:
    """Thresholds of `clean_corpus`. The defaults suit tiny Shakespeare's short speeches; web
    pipelines (Gopher, RefinedWeb) use e.g. min_words=50 and mean word length 3 to 10."""

    min_words: int = 5
    max_words: int = 100_000
    min_alpha_fraction: float = 0.7  # letters among the non-space characters
    mean_word_length: tuple[float, float] = (2.0, 10.0)
    max_duplicate_line_fraction: float = 0.3  # lines that repeat an earlier line of the document
    shingle_size: int = 5  # characters of the normalised text
    near_duplicate_jaccard: float = 0.8
    num_perm: int = 64  # MinHash signature length = bands * rows per band
    bands: int = 16
    seed: int = 0


# The steps of `clean_corpus`, in order; a document is counted against the first it fails.
CLEANING_STEPS = (
    "empty",
    "too_short",
    "too_long",
    "low_alpha",
    "odd_word_length",
    "repeated_lines",
    "exact_duplicate",
    "near_duplicate",
)


@dataclass
class CleaningResult:
    documents: list[str]  # the kept documents, tidied, in their original order
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (step, document as given)

    @property
    def removed(self) -> dict[str, int]:
        """How many documents each step removed, in pipeline order (zeros included)."""
        counts = Counter(step for step, _ in self.rejected)
        return {step: counts[step] for step in CLEANING_STEPS}


def tidy_document(doc: str) -> str:
    """The light normalisation a kept document gets: NFKC, special characters removed, spaces
    collapsed line by line, blank lines dropped. Case and punctuation stay: a model learns them.
    """
    doc = remove_special_characters(normalize_unicode(doc), keep="\n")
    return collapse_whitespace(doc, keep_newlines=True)


def dedup_key(doc: str) -> str:
    """The aggressive normalisation duplicates are judged on: lower case, no punctuation, one
    space between words. "To be, or not!" and "to be or NOT" get the same key."""
    return normalize_text(doc, abbreviations=None, spellings=None)


def _quality_failure(doc: str, config: CleaningConfig) -> str | None:
    words = doc.split()
    if len(words) < config.min_words:
        return "too_short"
    if len(words) > config.max_words:
        return "too_long"
    visible = "".join(words)
    if sum(ch.isalpha() for ch in visible) < config.min_alpha_fraction * len(visible):
        return "low_alpha"
    low, high = config.mean_word_length
    if not low <= len(visible) / len(words) <= high:
        return "odd_word_length"
    lines = doc.splitlines()
    if len(lines) - len(set(lines)) > config.max_duplicate_line_fraction * len(lines):
        return "repeated_lines"
    return None


def _validate_config(config: CleaningConfig) -> None:
    if not isinstance(config, CleaningConfig):
        raise InputTypeError(f"config must be a CleaningConfig, got {type(config).__name__}")
    for name in ("min_words", "max_words", "shingle_size", "num_perm", "bands"):
        require_positive(getattr(config, name), name, integer=True)
    if config.num_perm % config.bands:
        raise InputError(f"num_perm={config.num_perm} must be a multiple of bands={config.bands}")
    if config.min_words > config.max_words:
        raise InputError(f"min_words={config.min_words} exceeds max_words={config.max_words}")
    if not 0 < config.near_duplicate_jaccard <= 1:
        raise InputError("near_duplicate_jaccard must be in (0, 1]")


class NearDuplicateIndex:
    """Kept documents' shingle sets, bucketed by bands of their MinHash signatures (LSH).

    Two documents land in the same bucket of a band when their signatures agree on all of that
    band's rows; with Jaccard similarity J that happens in at least one of b bands of r rows with
    probability 1 - (1 - J^r)^b: near 1 for J = 0.8 with 16 bands of 4, small for unrelated text.
    """

    def __init__(self, threshold: float, num_perm: int = 64, bands: int = 16, seed: int = 0):
        self.threshold, self.num_perm, self.bands, self.seed = threshold, num_perm, bands, seed
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self._sets: list[set[str]] = []

    def _band_keys(self, shingle_set: set[str]) -> list[bytes]:
        signature = minhash_signature(shingle_set, self.num_perm, seed=self.seed)
        return [band.tobytes() for band in signature.reshape(self.bands, -1)]

    def add_unless_near_duplicate(self, shingle_set: set[str]) -> bool:
        """Add `shingle_set` and return True, or return False if it is a near duplicate of one
        already added (exact Jaccard >= threshold with a candidate from the buckets)."""
        band_keys = self._band_keys(shingle_set)
        candidates = {
            i
            for bucket, key in zip(self._buckets, band_keys, strict=True)
            for i in bucket.get(key, ())
        }
        if any(jaccard(shingle_set, self._sets[i]) >= self.threshold for i in candidates):
            return False
        for bucket, key in zip(self._buckets, band_keys, strict=True):
            bucket.setdefault(key, []).append(len(self._sets))
        self._sets.append(shingle_set)
        return True


def clean_corpus(
    corpus: str | Sequence[str], config: CleaningConfig | None = None
) -> CleaningResult:
    """Clean a corpus for language-model training, counting what each step removes.

    `corpus` is one text (split at blank lines by `split_documents`) or a list of documents.
    Steps, each applied to what the previous ones kept:

    1. tidy each document (`tidy_document`); drop those left empty;
    2. length and quality filters: word count, fraction of letters, mean word length, repeated
       lines (`CleaningConfig` holds the thresholds);
    3. exact duplicates: documents whose `dedup_key` has the same hash as an earlier one's;
    4. near duplicates: Jaccard similarity of character shingles of the key >= the threshold
       with an earlier kept document. MinHash buckets (`NearDuplicateIndex`) propose candidates,
       so each document is compared with a few others rather than all; exact Jaccard decides.

    Of duplicate documents, the first is kept.
    """
    config = config or CleaningConfig()
    _validate_config(config)
    if isinstance(corpus, str):
        documents = split_documents(corpus)
    else:
        documents = _require_text_list(corpus, "corpus")
    result = CleaningResult(documents=[])
    seen_hashes: set[bytes] = set()
    near = NearDuplicateIndex(
        config.near_duplicate_jaccard, config.num_perm, config.bands, seed=config.seed
    )
    for original in documents:
        doc = tidy_document(original)
        failure = "empty" if not doc else _quality_failure(doc, config)
        if failure is None:
            key = dedup_key(doc)
            # A 16-byte digest stands in for the text: at web scale the set must fit in memory.
            digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
            if digest in seen_hashes:
                failure = "exact_duplicate"
            else:
                seen_hashes.add(digest)
                if not near.add_unless_near_duplicate(shingles(key, config.shingle_size)):
                    failure = "near_duplicate"
        if failure is None:
            result.documents.append(doc)
        else:
            result.rejected.append((failure, original))
    return result
