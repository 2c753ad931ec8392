"""Edge-of-stability thresholds against the spectral radius of each update's iteration."""

import numpy as np
import pytest

from keras_curv.curvature.stability import stability_threshold


def one_step(rule, eta, mu, h, x, m):
    """One step of each update on f(x) = h x² / 2, as Keras (or Adam) writes it."""
    g = h * x
    if rule == "gd":
        return x - eta * g, 0.0  # no state beyond x
    if rule == "heavy_ball":  # keras SGD(momentum): m ← μm − ηg; x ← x + m
        m = mu * m - eta * g
        return x + m, m
    if rule == "nesterov":  # keras SGD(nesterov=True): x ← x + μm − ηg with the new m
        m = mu * m - eta * g
        return x + mu * m - eta * g, m
    m = mu * m + (1 - mu) * g  # Adam's first moment, P = 1
    return x - eta * m, m


def spectral_radius(rule, eta, mu, h):
    columns = [one_step(rule, eta, mu, h, *state) for state in ((1.0, 0.0), (0.0, 1.0))]
    return max(abs(np.linalg.eigvals(np.array(columns).T)))


@pytest.mark.parametrize(
    "rule, mu",
    [("gd", 0.0), ("heavy_ball", 0.9), ("heavy_ball", 0.5), ("nesterov", 0.9), ("ema", 0.9)],
)
def test_threshold_is_where_the_update_starts_to_diverge(rule, mu):
    eta = 0.05
    threshold = stability_threshold(eta, mu, rule)
    assert spectral_radius(rule, eta, mu, 0.999 * threshold) < 1.0
    assert spectral_radius(rule, eta, mu, 1.001 * threshold) > 1.0


def test_known_values_and_errors():
    assert stability_threshold(0.1) == pytest.approx(20.0)
    assert stability_threshold(0.1, 0.9) == pytest.approx(38.0)
    assert stability_threshold(1e-3, 0.9, "ema") == pytest.approx(38000.0)
    with pytest.raises(ValueError, match="learning_rate"):
        stability_threshold(0.0)
    with pytest.raises(ValueError, match="momentum"):
        stability_threshold(0.1, 1.0)
    with pytest.raises(ValueError, match="rule"):
        stability_threshold(0.1, 0.5, "adam")
