"""Graded tests for chapter 01 (data preprocessing): `minillm grade ch01`.

References are scipy (`stats.zscore`, `stats.median_abs_deviation`, `ndimage.gaussian_filter1d`),
numpy (`percentile`, `polyfit`), pandas (`rolling`, `interpolate`) and hand-computed values.
Float comparisons: atol 1e-12 where the reference computes the same formula in float64, 1e-9
for least-squares fits (solvers differ in rounding), 1e-4 for values quoted to 4 decimals.
"""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.ndimage import gaussian_filter1d

# What the stub imports, for the worker to have ready (a submission that imports more, torch say,
# pays for that import in each of its tests): not the default list, whose torch alone takes 3 s.
WORKER_IMPORTS = ("numpy",)

# What each exercise must not call: the library function it asks you to write (a call fails
# the test). A guard against the obvious shortcut; the stubs' docstrings name the same.
OFF_LIMITS = {
    "zscore": ("scipy.stats.zscore", "minillm.preprocess.zscore"),
    "max_abs_zscore": ("scipy.stats.zscore", "minillm.preprocess.max_abs_zscore"),
    "iqr_fences": ("numpy.percentile", "numpy.quantile", "minillm.preprocess.iqr_fences"),
    "modified_zscore": (
        "scipy.stats.median_abs_deviation",
        "minillm.preprocess.modified_zscore",
    ),
    "gaussian_kernel": ("scipy.ndimage.gaussian_filter1d", "minillm.preprocess.gaussian_kernel"),
    "centered_moving_average": (
        "pandas.Series.rolling",
        "pandas.DataFrame.rolling",
        "minillm.preprocess.moving_average",
    ),
    "normalize_text": (
        "minillm.preprocess.normalize_text",
        "minillm.preprocess.remove_punctuation",
        "minillm.preprocess.collapse_whitespace",
    ),
    "linear_interpolate": ("pandas.Series.interpolate", "pandas.DataFrame.interpolate"),
    "char_ngram_jaccard": ("minillm.preprocess.jaccard", "minillm.preprocess.shingles"),
    "regression_impute": ("minillm.preprocess.regression_impute",),
}

F64 = {"atol": 1e-12, "rtol": 0.0}
FIT = {"atol": 1e-9, "rtol": 0.0}
SEED_LIST = [10, 12, 12, 13, 12, 100]


def normal(n, seed=0):
    return np.random.default_rng(seed).normal(3.0, 2.0, size=n)


@pytest.mark.points(2)
def test_zscore_uses_the_population_std(impl):
    """Catches the sample std (dividing the variance by n - 1, numpy's `ddof=1` or pandas'
    `.std()`): scipy's default and the seed's example divide by n."""
    ex = impl("ch01_preprocessing")
    z = ex.zscore(SEED_LIST)
    assert z[-1] == pytest.approx(2.2352, abs=1e-4), "z(100) in the seed's list is 2.2352"
    for n in (2, 5, 40):
        x = normal(n, seed=n)
        np.testing.assert_allclose(ex.zscore(x), stats.zscore(x), **F64)
    np.testing.assert_allclose(ex.zscore([1, 2, 3]), stats.zscore([1, 2, 3]), **F64)  # ints


@pytest.mark.points(2)
def test_max_abs_zscore_matches_the_extreme_sample(impl):
    """Catches swapping the two bounds, answering sqrt(n) or n - 1, or ignoring `ddof`: for each
    n the bound must equal the |z| that scipy computes for n - 1 equal values and one other."""
    ex = impl("ch01_preprocessing")
    assert ex.max_abs_zscore(6) == pytest.approx(2.2361, abs=1e-4)
    assert ex.max_abs_zscore(6, ddof=1) == pytest.approx(2.0412, abs=1e-4)
    for n in (2, 3, 6, 11, 50):
        extreme = [0.0] * (n - 1) + [1.0]
        for ddof in (0, 1):
            expected = abs(stats.zscore(extreme, ddof=ddof)[-1])
            assert ex.max_abs_zscore(n, ddof) == pytest.approx(expected, abs=1e-12), (n, ddof)


@pytest.mark.points(2)
def test_iqr_fences_interpolate_the_quartiles(impl):
    """Catches quartiles taken as sorted(x)[n // 4] without interpolation, Tukey's
    median-of-halves hinges, and forgetting to sort: every length from 4 to 13 is checked
    against `np.percentile`."""
    ex = impl("ch01_preprocessing")
    assert ex.iqr_fences(SEED_LIST) == pytest.approx((10.875, 13.875), abs=1e-12)
    for n in range(4, 14):
        x = normal(n, seed=n)  # unsorted
        q1, q3 = np.percentile(x, [25, 75])
        for k in (1.5, 3.0):
            expected = (q1 - k * (q3 - q1), q3 + k * (q3 - q1))
            assert ex.iqr_fences(x, k) == pytest.approx(expected, abs=1e-12), (n, k)


@pytest.mark.points(2)
def test_modified_zscore_uses_median_mad_and_0_6745(impl):
    """Catches a missing 0.6745 constant, the mean in place of the median, and the mean
    absolute deviation in place of the median one."""
    ex = impl("ch01_preprocessing")
    scores = ex.modified_zscore(SEED_LIST)
    assert scores[-1] == pytest.approx(118.7120, abs=1e-4)  # 0.6745 * 88 / 0.5
    assert scores[0] == pytest.approx(-2.6980, abs=1e-4)
    x = normal(31)
    x[3] = 40.0  # an outlier moves the mean and the mean deviation, not the median and MAD
    reference = 0.6745 * (x - np.median(x)) / stats.median_abs_deviation(x)
    np.testing.assert_allclose(ex.modified_zscore(x), reference, **F64)


@pytest.mark.points(2)
def test_gaussian_kernel_is_scipys_impulse_response(impl):
    """Catches unnormalised weights, exp(-t^2 / sigma^2) without the 2, and a radius of
    int(truncate * sigma) without rounding (too short for sigma = 0.9, truncate = 4.0)."""
    ex = impl("ch01_preprocessing")
    for sigma, truncate in [(1.0, 4.0), (0.9, 4.0), (2.5, 3.0), (0.6, 1.0)]:
        radius = int(truncate * sigma + 0.5)
        impulse = np.zeros(4 * radius + 3)
        impulse[2 * radius + 1] = 1.0
        response = gaussian_filter1d(impulse, sigma, mode="constant", truncate=truncate)
        kernel = np.asarray(ex.gaussian_kernel(sigma, truncate))
        assert kernel.shape == (2 * radius + 1,), f"sigma={sigma}, truncate={truncate}"
        np.testing.assert_allclose(kernel, response[radius + 1 : 3 * radius + 2], **F64)


@pytest.mark.points(2)
def test_centered_moving_average_matches_pandas_with_odd_windows(impl):
    """Catches zero-padded edges (`np.convolve(..., mode="same")` drags the ends towards 0), a
    trailing window (`rolling(window)` without `center`), and NaN at the ends."""
    ex = impl("ch01_preprocessing")
    np.testing.assert_allclose(
        ex.centered_moving_average([1, 2, 3, 4, 5], 3), [1.5, 2.0, 3.0, 4.0, 4.5], **F64
    )
    x = normal(15) + 10.0  # far from 0, so zero padding shows at the ends
    for window in (1, 3, 5, 15):
        reference = pd.Series(x).rolling(window, center=True, min_periods=1).mean()
        np.testing.assert_allclose(ex.centered_moving_average(x, window), reference, **F64)


@pytest.mark.points(1)
def test_centered_moving_average_matches_pandas_with_even_windows(impl):
    """Catches an even window centred the wrong way (one more value after the point than
    before, where pandas takes one more before)."""
    ex = impl("ch01_preprocessing")
    x = normal(12)
    for window in (2, 4, 12):
        reference = pd.Series(x).rolling(window, center=True, min_periods=1).mean()
        np.testing.assert_allclose(ex.centered_moving_average(x, window), reference, **F64)


@pytest.mark.points(2)
def test_normalize_text(impl):
    """Catches not collapsing whitespace (or not stripping the ends), removing only ASCII
    `string.punctuation` (curly quotes, dashes and ellipses survive), skipping NFKC, deleting
    punctuation instead of spacing it (words glue together), and lower-casing before NFKC."""
    ex = impl("ch01_preprocessing")
    cases = {
        "  Hello,\tWORLD…  “ﬁne”!  ": "hello world fine",
        "end.Next—thing": "end next thing",
        "Ｆｕｌｌ－ｗｉｄｔｈ ＴＥＸＴ": "full width text",
        "a\n\n b \u00a0 c": "a b c",
        "¿Qué? ¡Sí!": "qué sí",
        "ℍello at 5 ㎒": "hello at 5 mhz",  # NFKC makes capitals: lower-case after it
        "": "",
        "no change": "no change",
    }
    for text, expected in cases.items():
        assert ex.normalize_text(text) == expected, text


@pytest.mark.points(2)
def test_linear_interpolate_fills_inside_and_at_the_edges(impl):
    """Catches NaNs left before the first or after the last known value, extrapolating the end
    slopes, and changing the caller's array in place."""
    ex = impl("ch01_preprocessing")
    x = np.array([np.nan, 1.0, np.nan, np.nan, 4.0, np.nan])
    before = x.copy()
    np.testing.assert_allclose(ex.linear_interpolate(x), [1, 1, 2, 3, 4, 4], **F64)
    np.testing.assert_array_equal(x, before)  # NaNs compare equal here
    rng = np.random.default_rng(3)
    y = rng.normal(size=40)
    y[[0, 1, 7, 8, 9, 20, 38, 39]] = np.nan
    reference = pd.Series(y).interpolate(limit_direction="both").to_numpy()
    np.testing.assert_allclose(ex.linear_interpolate(list(y)), reference, **F64)


@pytest.mark.points(2)
def test_char_ngram_jaccard(impl):
    """Catches counting repeated n-grams (a multiset instead of a set), an off-by-one that
    drops the last n-gram, dividing by the smaller set instead of the union, and texts shorter
    than n."""
    ex = impl("ch01_preprocessing")
    assert ex.char_ngram_jaccard("night", "nacht", 2) == pytest.approx(1 / 7, abs=1e-12)
    assert ex.char_ngram_jaccard("aaaa", "aa", 2) == pytest.approx(1.0, abs=1e-12)
    assert ex.char_ngram_jaccard("abcd", "bcd", 3) == pytest.approx(0.5, abs=1e-12)  # abc bcd | bcd
    assert ex.char_ngram_jaccard("abcde", "xbcdy", 3) == pytest.approx(1 / 5, abs=1e-12)
    assert ex.char_ngram_jaccard("ab", "ab", 3) == pytest.approx(1.0, abs=1e-12)
    assert ex.char_ngram_jaccard("ab", "abc", 3) == pytest.approx(0.0, abs=1e-12)
    a, b = "the cat sat on the mat", "the cat sat on a mat"
    grams_a = {a[i : i + 4] for i in range(len(a) - 3)}
    grams_b = {b[i : i + 4] for i in range(len(b) - 3)}
    expected = len(grams_a & grams_b) / len(grams_a | grams_b)
    assert ex.char_ngram_jaccard(a, b, 4) == pytest.approx(expected, abs=1e-12)


@pytest.mark.points(3)
def test_regression_impute_fits_with_an_intercept(impl):
    """Catches a fit without intercept (no column of ones), fitting on rows whose target is
    NaN or was mean-filled first, overwriting known values, and changing the input in place."""
    ex = impl("ch01_preprocessing")
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=25), rng.normal(size=25)
    truth = 2.0 * x1 - 3.0 * x2 + 5.0  # exact, so any correct least-squares fit recovers it
    X = np.column_stack([x1, truth, x2])
    X[[1, 6, 13, 24], 1] = np.nan
    before = X.copy()
    filled = ex.regression_impute(X, target=1)
    np.testing.assert_allclose(filled[:, 1], truth, **FIT)
    np.testing.assert_array_equal(filled[:, [0, 2]], before[:, [0, 2]])
    np.testing.assert_array_equal(X, before)

    # With noise, one predictor: the fill is numpy's fitted line at the missing x.
    x = rng.normal(size=30)
    y = 0.7 * x + 4.0 + rng.normal(scale=0.5, size=30)
    y[[0, 9, 17]] = np.nan
    known = ~np.isnan(y)
    slope, intercept = np.polyfit(x[known], y[known], 1)
    filled = ex.regression_impute(np.column_stack([x, y]), target=1)
    np.testing.assert_allclose(filled[~known, 1], slope * x[~known] + intercept, **FIT)
    np.testing.assert_array_equal(filled[known, 1], y[known])
    assert not math.isnan(filled.sum())
