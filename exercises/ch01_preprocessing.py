"""Chapter 01 exercises: data preprocessing from numpy primitives. Replace each
`raise NotImplementedError`.

Numeric functions take a 1-D sequence of numbers (a list or an array) and return float64 numpy
arrays; you may assume the input is valid (not empty, no NaN unless the function is about NaN).
Use numpy and the standard library; the tests compare your answers with scipy and pandas, so do
not call those (or `minillm.preprocess`) here.

Grade with `minillm grade ch01`, or
`pytest tests/exercises/test_ch01_preprocessing.py --impl exercises`.
"""

from __future__ import annotations

import math  # noqa: F401 -- you will need these
import unicodedata  # noqa: F401
from collections.abc import Sequence

import numpy as np


def zscore(x: Sequence[float]) -> np.ndarray:
    """Standard scores (x - mean) / std with the population std (divide the variance by n).

    That is `scipy.stats.zscore`'s default, the one seed 004 used.

    Args:
        x: `(n,)` numbers, not all equal.

    Returns:
        `(n,)` float64: how many standard deviations each value lies from the mean.

    Example:
        >>> zscore([1, 2, 3])
        array([-1.22474487,  0.        ,  1.22474487])

    Off limits: `scipy.stats.zscore`, `minillm.preprocess.zscore` (this exercise asks you to write
    it; a call fails the test).
    """
    raise NotImplementedError


def max_abs_zscore(n: int, ddof: int = 0) -> float:
    """The largest |z| that any sample of `n` values (n >= 2) can have.

    It is reached when one value differs and the other n - 1 are equal. Work it out for that
    sample: with the population std (`ddof=0`, variance divided by n) and with the sample std
    (`ddof=1`, divided by n - 1).

    Example:
        >>> round(max_abs_zscore(6), 4)  # so |z| > 3 is impossible with 6 values
        2.2361

    Off limits: `scipy.stats.zscore`, `minillm.preprocess.max_abs_zscore` (this exercise asks you to
    write it; a call fails the test).
    """
    raise NotImplementedError


def iqr_fences(x: Sequence[float], k: float = 1.5) -> tuple[float, float]:
    """Tukey's fences (Q1 - k * IQR, Q3 + k * IQR), where IQR = Q3 - Q1.

    Quartiles by linear interpolation (numpy's default): sort x; the q-th quantile sits at
    position q * (n - 1) of the sorted values, and a fractional position interpolates between
    its two neighbours.

    Args:
        x: `(n,)` numbers.
        k: how many IQRs beyond the quartiles a value must lie to be an outlier.

    Returns:
        `(low, high)` as floats.

    Example:
        >>> iqr_fences([10, 12, 12, 13, 12, 100])  # Q1 = 12, Q3 = 12.75
        (10.875, 13.875)

    Off limits: `numpy.percentile`, `numpy.quantile`, `minillm.preprocess.iqr_fences` (this exercise
    asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def modified_zscore(x: Sequence[float]) -> np.ndarray:
    """Robust scores 0.6745 * (x - median) / MAD, where MAD = median(|x - median|).

    0.6745 makes the score comparable with an ordinary z-score for normally distributed data
    (the usual outlier cut is |score| > 3.5).

    Args:
        x: `(n,)` numbers whose MAD is not 0 (it is when most values equal the median).

    Returns:
        `(n,)` float64.

    Example:
        >>> modified_zscore([10, 12, 12, 13, 12, 100]).round(3)  # median 12, MAD 0.5
        array([ -2.698,   0.   ,   0.   ,   1.349,   0.   , 118.712])

    Off limits: `scipy.stats.median_abs_deviation`, `minillm.preprocess.modified_zscore` (this
    exercise asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """The weights `scipy.ndimage.gaussian_filter1d` smooths with.

    Radius r = int(truncate * sigma + 0.5); weight at offset t (t = -r..r) proportional to
    exp(-t^2 / (2 sigma^2)); the weights sum to 1.

    Returns:
        `(2r + 1,)` float64, symmetric, largest in the middle.

    Example:
        >>> gaussian_kernel(1.0, truncate=1.0).round(4)  # r = 1
        array([0.2741, 0.4519, 0.2741])

    Off limits: `scipy.ndimage.gaussian_filter1d`, `minillm.preprocess.gaussian_kernel` (this
    exercise asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def centered_moving_average(x: Sequence[float], window: int) -> np.ndarray:
    """Centred moving average of the same length as x, like pandas'
    `pd.Series(x).rolling(window, center=True, min_periods=1).mean()`.

    Output i is the mean of x[i - window // 2] .. x[i + (window - 1) // 2] (an even window takes
    one more value before i than after). Near the ends, average only the values that exist.

    Args:
        x: `(n,)` numbers.
        window: 1 <= window <= n.

    Returns:
        `(n,)` float64.

    Example:
        >>> centered_moving_average([1, 2, 3, 4, 5], 3)
        array([1.5, 2. , 3. , 4. , 4.5])

    Off limits: `pandas.Series.rolling`, `pandas.DataFrame.rolling`,
    `minillm.preprocess.moving_average` (this exercise asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def normalize_text(text: str) -> str:
    """Normalise text for comparison, in this order:

    1. Unicode NFKC (`unicodedata.normalize`): "ﬁ" -> "fi", full-width "Ａ" -> "A";
    2. lower case;
    3. every punctuation character, i.e. every character whose `unicodedata.category` starts
       with "P" (this includes “curly quotes”, — dashes and … ellipses), becomes a space;
    4. every run of whitespace becomes one space, with none at either end.

    Example:
        >>> normalize_text("  Hello,\\tWORLD…  “ﬁne”!  ")
        'hello world fine'

    Off limits: `minillm.preprocess.normalize_text`, `remove_punctuation`, `collapse_whitespace`
    (this exercise asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def linear_interpolate(x: Sequence[float]) -> np.ndarray:
    """Fill the NaNs of x by straight lines between the nearest known values on either side.

    A NaN before the first known value takes the first known value; one after the last takes
    the last (no extrapolation). Positions are the indices 0..n-1. Return a new array; leave x
    as it was.

    Args:
        x: `(n,)` numbers, at least one of them not NaN.

    Returns:
        `(n,)` float64 without NaN.

    Example:
        >>> linear_interpolate([np.nan, 1.0, np.nan, np.nan, 4.0, np.nan])
        array([1., 1., 2., 3., 4., 4.])

    Off limits: `pandas.Series.interpolate`, `pandas.DataFrame.interpolate` (this exercise asks you
    to write it; a call fails the test).
    """
    raise NotImplementedError


def char_ngram_jaccard(a: str, b: str, n: int = 3) -> float:
    """Jaccard similarity |A & B| / |A | B| of the *sets* of character n-grams of a and b.

    The n-grams of a text are its substrings of length n (a text of length L >= n has L - n + 1
    of them). A text shorter than n counts as a single n-gram: itself.

    Example:
        >>> char_ngram_jaccard("night", "nacht", 2)  # {ni ig gh ht} vs {na ac ch ht}
        0.14285714285714285

    Off limits: `minillm.preprocess.jaccard`, `minillm.preprocess.shingles` (this exercise asks you
    to write it; a call fails the test).
    """
    raise NotImplementedError


def regression_impute(X: np.ndarray, target: int) -> np.ndarray:
    """Fill the NaNs of column `target` with a least-squares linear prediction from the others.

    Fit column[target] ~ b0 + b1 * column[j1] + b2 * column[j2] + ... (every other column, and an
    intercept b0) on the rows where the target is known, then predict the rows where it is
    missing. Known values stay exactly as they were; return a new array.

    Args:
        X: `(rows, cols)` float; NaN only in column `target`.
        target: index of the column to fill.

    Returns:
        `(rows, cols)` float64 without NaN.

    Example:
        >>> X = np.array([[0.0, 1.0], [1.0, 3.0], [2.0, np.nan], [3.0, 7.0]])
        >>> round(float(regression_impute(X, target=1)[2, 1]), 9)  # y = 1 + 2 x
        5.0

    Off limits: `minillm.preprocess.regression_impute` (this exercise asks you to write it; a call
    fails the test).
    """
    raise NotImplementedError
