"""spdsim.verdict: intervals and verdicts on synthetic measurements whose truth is known, the interval's
coverage, and executor validate's exit status from the verdicts."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from spdsim.verdict import (FAIL, PASS, UNDETERMINED, Interval, bootstrap, error_interval, median_interval,
                            overall, repeats_to_decide, verdict)


def _noisy(true: float, sd: float, k: int, seed: int) -> list[float]:
    return list(true * (1 + sd * np.random.default_rng(seed).standard_normal(k)))


def test_a_right_prediction_with_a_quiet_measurement_passes():
    meas = _noisy(100.0, 0.01, 30, 1)                  # 1% noise, 30 repeats
    err = error_interval(meas, [100.0] * 30, relative=True)
    assert err.high - err.low < 2.0
    assert verdict(err, 5.0) == PASS


def test_a_prediction_far_off_fails_and_a_near_miss_with_noise_is_undetermined():
    meas = _noisy(100.0, 0.01, 30, 2)
    assert verdict(error_interval(meas, [80.0] * 30, relative=True), 5.0) == FAIL       # −20% ± < 1%
    noisy = _noisy(100.0, 0.25, 8, 3)                   # ±25% and 8 repeats: a −5% error cannot be told
    assert verdict(error_interval(noisy, [95.0] * 8, relative=True), 5.0) == UNDETERMINED


def test_more_repeats_decide_what_few_could_not():
    few = error_interval(_noisy(100.0, 0.2, 6, 4), [99.0] * 6, relative=True)
    many = error_interval(_noisy(100.0, 0.2, 400, 4), [99.0] * 400, relative=True)
    assert verdict(few, 5.0) == UNDETERMINED
    assert many.high - many.low < few.high - few.low
    assert verdict(many, 5.0) == PASS
    need = repeats_to_decide(few, 5.0, 6)
    assert need is not None and need > 6


def test_absolute_errors_for_the_bubble():
    meas = [0.20, 0.21, 0.19, 0.20, 0.20]
    err = error_interval(meas, [0.22] * 5, relative=False)
    assert err.estimate == pytest.approx(2.0)               # percentage points
    assert verdict(err, 3.0) == PASS and verdict(err, 1.0) == FAIL


def test_pairs_move_together():
    """Both sides of a pair slow by the same factor in some rounds: the error does not move."""
    slow = [1.0, 1.3, 0.8, 1.1, 0.9, 1.25]
    meas = [100 * f for f in slow]
    pred = [105 * f for f in slow]
    err = error_interval(meas, pred, relative=True)
    assert err.low == pytest.approx(5.0) and err.high == pytest.approx(5.0)


def test_overall_and_one_repeat():
    assert overall([PASS, PASS]) == PASS
    assert overall([PASS, UNDETERMINED]) == UNDETERMINED
    assert overall([UNDETERMINED, FAIL, PASS]) == FAIL
    one = error_interval([10.0], [11.0], relative=True)
    assert one.low == one.high == pytest.approx(10.0)
    with pytest.raises(ValueError):
        error_interval([1.0, 2.0], [1.0], relative=True)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(st.integers(0, 10_000))
def test_median_interval_covers_the_true_median_at_about_its_level(seed):
    """Lognormal samples of 25: the 95% percentile-bootstrap interval of the median covers the true median
    (e^0 = 1) in about 95% of 100 seeded trials (the percentile bootstrap of a median is a little
    conservative or liberal at small n, and 100 trials have a binomial sd of 2 points: accept 0.87-1)."""
    rng = np.random.default_rng(seed)
    hits = 0
    trials = 100
    for t in range(trials):
        x = rng.lognormal(0.0, 0.5, 25)
        lo, hi = bootstrap(lambda idx: float(np.median(x[idx])), len(x), seed=t, resamples=200)
        hits += lo <= 1.0 <= hi
    assert 0.87 <= hits / trials <= 0.995          # and not always: an interval too wide would cover every time


def test_validate_exit_status_follows_the_verdicts():
    from executor.validate import exit_status
    row = lambda v: {"verdict": v}                                        # noqa: E731
    assert exit_status([row(PASS), row(PASS)]) == 0
    assert exit_status([row(PASS), row(FAIL), row(UNDETERMINED)]) == 1
    assert exit_status([row(PASS), row(UNDETERMINED)]) == 3


def test_median_interval_brackets_its_estimate():
    iv = median_interval([3.0, 1.0, 2.0, 5.0, 4.0])
    assert iv.estimate == 3.0 and iv.low <= 3.0 <= iv.high
    assert isinstance(iv, Interval) and iv.half_width >= 0


def test_throughput_is_total_work_over_total_time_and_steady_on_a_two_speed_host():
    from spdsim.verdict import throughput
    assert throughput([10.0, 20.0]) == pytest.approx(2 / (1 / 10 + 1 / 20))
    # a host at 100 or 50 tok/s, half the time each, in random order: the median jumps between the two
    # levels with the sample, throughput (N / mean time) stays near 66.7
    rng = np.random.default_rng(5)
    samples = [rng.choice([100.0, 50.0], 21) for _ in range(200)]
    medians = np.array([np.median(x) for x in samples])
    through = np.array([throughput(x) for x in samples])
    assert medians.std() > 3 * through.std()
    assert abs(through.mean() - 200 / 3) < 1.0
