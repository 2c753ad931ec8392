r"""Edge-of-stability thresholds: the largest (preconditioned) curvature an update tolerates.

On a quadratic with Hessian :math:`H` and a frozen preconditioner :math:`P`, an update
:math:`\theta \leftarrow \theta - \eta P^{-1} u` (with :math:`u` the gradient or its
momentum average) diverges along an eigenvector of :math:`P^{-1} H` whose eigenvalue
exceeds the threshold returned here (Cohen et al. 2021, 2022):

==========================================  ==============================================
update                                      threshold on :math:`\lambda_1(P^{-1} H)`
==========================================  ==============================================
gradient descent                            :math:`2 / \eta`
heavy ball, momentum :math:`\mu`            :math:`(2 + 2\mu) / \eta`
Nesterov (Keras's form), :math:`\mu`        :math:`(2 + 2\mu) / ((1 + 2\mu)\,\eta)`
EMA momentum :math:`\beta_1` (Adam)         :math:`(2 + 2\beta_1) / ((1 - \beta_1)\,\eta)`
==========================================  ==============================================

The EMA form :math:`m \leftarrow \beta_1 m + (1 - \beta_1) g` is heavy ball with rate
:math:`(1 - \beta_1)\eta` and momentum :math:`\beta_1`: 38/η for Adam's
:math:`\beta_1 = 0.9`. Bias corrections tend to 1 and are ignored.
"""

from __future__ import annotations

from keras_curv._internal.validation import choice, number, positive

RULES = ("gd", "heavy_ball", "nesterov", "ema")


def stability_threshold(
    learning_rate: float, momentum: float = 0.0, rule: str = "heavy_ball"
) -> float:
    """The threshold on ``λ₁(P⁻¹H)`` above which the update diverges (table above).

    Args:
        learning_rate: ``η > 0``.
        momentum: ``μ`` (or ``β1`` for ``rule="ema"``), in ``[0, 1)``.
        rule: ``"gd"`` (momentum ignored), ``"heavy_ball"``, ``"nesterov"`` or ``"ema"``.

    Returns:
        The threshold, in units of curvature.

    Example:
        >>> stability_threshold(0.1)                        # 2 / η
        20.0
        >>> round(stability_threshold(1e-3, 0.9, "ema"))    # Adam: 38 / η
        38000
    """
    eta = positive(learning_rate, "learning_rate")
    mu = number(momentum, "momentum", low=0.0, high=1.0, high_open=True)
    rule = choice(rule, "rule", RULES)
    if rule == "gd" or mu == 0.0:
        return 2.0 / eta
    if rule == "heavy_ball":
        return (2.0 + 2.0 * mu) / eta
    if rule == "nesterov":
        return (2.0 + 2.0 * mu) / ((1.0 + 2.0 * mu) * eta)
    return (2.0 + 2.0 * mu) / ((1.0 - mu) * eta)
