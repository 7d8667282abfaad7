"""jaxkv.outliers (the one definition of outlier channels) and jaxkv.libm (the one C math library loader)."""

from __future__ import annotations

import numpy as np
import pytest

from fuzz import cases
from jaxkv import libm, outliers, sensitivity


def test_counts_and_scales():
    assert [outliers.FUZZ.count(d) for d in (1, 8, 16, 64, 128)] == [1, 1, 1, 4, 8]  # D // 16, at least one
    assert [outliers.SENSITIVITY.count(d) for d in (16, 32, 64, 128)] == [1, 1, 2, 4]  # D // 32, at least one
    assert outliers.Outliers(0, 5.0).count(64) == 0
    assert (outliers.FUZZ.scale, outliers.MENU.scale, outliers.SENSITIVITY.scale) == (50.0, 30.0, 10.0)
    x = outliers.FUZZ.apply(np.random.default_rng(0), np.ones((3, 64)))
    assert sorted(np.unique(x)) == [1.0, 50.0] and np.all(np.sum(x == 50.0, axis=-1) == 4)
    assert set(outliers.PROFILES.values()) == {outliers.FUZZ, outliers.MENU, outliers.SENSITIVITY}


@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 33), (1, 1, 1, 8), (4, 128), (2, 17)])
def test_profiles_reproduce_the_fuzzers_draws(shape):
    """The fuzz and menu profiles draw exactly what fuzz.cases draws today (same generator calls), so
    fuzz.cases can switch to them without changing a case."""
    for seed in range(4):
        r = np.random.default_rng(seed)
        np.testing.assert_array_equal(cases.DISTRIBUTIONS["outlier"](np.random.default_rng(seed), shape),
                                      outliers.FUZZ.apply(r, r.standard_normal(shape)))
        r = np.random.default_rng(seed)
        np.testing.assert_array_equal(cases.menu_values(np.random.default_rng(seed), shape, "outlier"),
                                      outliers.MENU.apply(r, r.standard_normal(shape)).astype(np.float32))


def test_sensitivity_outliers_use_the_sensitivity_profile():
    assert sensitivity.DISTRIBUTIONS["outliers"].outliers is outliers.SENSITIVITY
    assert sensitivity.DISTRIBUTIONS["normal"].outliers is None
    s = sensitivity.channel_scales(3, 128, "outliers")
    assert sorted(np.unique(s)) == [1.0, 10.0] and int(np.sum(s == 10.0)) == 4


def test_libm_loaded_once_and_exact_cases():
    if libm.lib() is None:
        pytest.skip("no C math library loads here")
    assert libm.powf() is libm.powf() and libm.expf() is libm.expf()
    assert libm.powf()(2.0, 3.0) == 8.0 and libm.powf()(2.0, -4.0) == 0.0625 and libm.expf()(0.0) == 1.0
