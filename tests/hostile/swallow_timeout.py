# Every function loops forever and swallows whatever is raised to stop it (a timeout included).
import time as _time


def _forever(*args, **kwargs):
    while True:
        try:
            _time.sleep(100)
        except BaseException:  # noqa: BLE001
            pass


zscore = max_abs_zscore = iqr_fences = modified_zscore = gaussian_kernel = _forever
centered_moving_average = normalize_text = linear_interpolate = _forever
char_ngram_jaccard = regression_impute = _forever
