# Answers every exercise by calling the library function it asks for: minillm.preprocess,
# scipy and pandas, through every name they go by.
import numpy as _np
import pandas as _pd
from scipy import stats as _stats
from scipy.ndimage import gaussian_filter1d as _gf

from minillm import preprocess as _pre


def zscore(x):
    return _stats.zscore(_np.asarray(x, dtype=float))


def max_abs_zscore(n, ddof=0):
    return _pre.max_abs_zscore(n, ddof=ddof)


def iqr_fences(x, k=1.5):
    q1, q3 = _np.percentile(x, [25, 75])
    return q1 - k * (q3 - q1), q3 + k * (q3 - q1)


def modified_zscore(x):
    return _pre.modified_zscore(x)


def gaussian_kernel(sigma, truncate=4.0):
    return _pre.gaussian_kernel(sigma, truncate)


def centered_moving_average(x, window):
    return _pd.Series(x).rolling(window, center=True, min_periods=1).mean().to_numpy()


def normalize_text(text):
    return _pre.normalize_text(text)


def linear_interpolate(x):
    return _pd.Series(x, dtype=float).interpolate(limit_direction="both").to_numpy()


def char_ngram_jaccard(a, b, n=3):
    return _pre.jaccard(_pre.shingles(a, n), _pre.shingles(b, n))


def regression_impute(X, target):
    return _np.asarray(_pre.regression_impute(_pd.DataFrame(X)), dtype=float)


_unused = _gf
