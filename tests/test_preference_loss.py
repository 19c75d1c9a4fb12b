"""`preference_loss` against the published formulas, written here independently in numpy (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from maxlm.train.preference import LOSS_TYPES, bradley_terry_loss, mixed_preference_loss, preference_loss

BETA, LS, GAMMA = 0.3, 0.1, 0.7


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference(kind, pc, pr, rc, rr, lc, lr, beta=BETA, ls=LS):
    """TRL's DPOTrainer.dpo_loss / CPOTrainer / ORPOTrainer, one branch per loss type."""
    cr, rj = pc - rc, pr - rr
    logits = (pc - pr) - (rc - rr)
    if kind == "sigmoid":
        return -logsig(beta * logits) * (1 - ls) - logsig(-beta * logits) * ls
    if kind == "robust":
        return (-logsig(beta * logits) * (1 - ls) + logsig(-beta * logits) * ls) / (1 - 2 * ls)
    if kind == "hinge":
        return np.maximum(0.0, 1 - beta * logits)
    if kind == "ipo":
        norm = cr / lc - rj / lr
        return (norm - 1 / (2 * beta)) ** 2
    if kind == "exo_pair":
        return sig(beta * logits) * (logsig(beta * logits) - math.log(1 - ls)) + sig(-beta * logits) * (
            logsig(-beta * logits) - math.log(ls))
    if kind == "nca_pair":
        a, b = beta * cr, beta * rj
        return -logsig(a) - 0.5 * logsig(-a) - 0.5 * logsig(-b)
    if kind == "sppo_hard":
        return (cr - 0.5 / beta) ** 2 + (rj + 0.5 / beta) ** 2
    if kind == "apo_zero":
        return 1 - sig(beta * cr) + sig(beta * rj)
    if kind == "apo_down":
        return sig(beta * cr) + 1 - sig(beta * (cr - rj))
    if kind == "sigmoid_norm":
        return -logsig(beta * (cr / lc - rj / lr))
    if kind == "simpo":
        z = beta * (pc / lc - pr / lr - GAMMA / beta)
        return -logsig(z) * (1 - ls) - logsig(-z) * ls
    if kind == "orpo":
        mc, mr = pc / lc, pr / lr
        log_odds = (mc - mr) - (np.log1p(-np.exp(mc)) - np.log1p(-np.exp(mr)))
        return -mc - beta * logsig(log_odds)
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def pairs():
    rs = np.random.RandomState(0)
    lc = rs.randint(1, 40, size=16).astype(np.float64)
    lr = rs.randint(1, 40, size=16).astype(np.float64)
    pc = -rs.uniform(0.05, 3.0, 16) * lc
    pr = -rs.uniform(0.05, 3.0, 16) * lr
    rc = pc + rs.normal(0, 2.0, 16)
    rr = pr + rs.normal(0, 2.0, 16)
    return pc, pr, np.minimum(rc, -1e-3), np.minimum(rr, -1e-3), lc, lr


@pytest.mark.parametrize("kind", LOSS_TYPES)
def test_every_loss_matches_its_formula(kind, pairs):
    pc, pr, rc, rr, lc, lr = pairs
    f32 = [np.float32(x) for x in pairs]
    losses, chosen_r, rejected_r = preference_loss(*f32[:4], loss_type=kind, beta=BETA, label_smoothing=LS,
                                                   chosen_lengths=f32[4], rejected_lengths=f32[5],
                                                   simpo_gamma=GAMMA)
    want = reference(kind, pc, pr, rc, rr, lc, lr)
    np.testing.assert_allclose(np.asarray(losses), want, rtol=2e-5, atol=2e-5)
    if kind in ("orpo", "simpo"):
        np.testing.assert_allclose(np.asarray(chosen_r), BETA * pc / lc, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(rejected_r), BETA * pr / lr, rtol=1e-5)
    else:
        np.testing.assert_allclose(np.asarray(chosen_r), BETA * (pc - rc), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(rejected_r), BETA * (pr - rr), rtol=1e-5, atol=1e-5)


def test_sigmoid_is_ln2_when_policy_equals_reference(pairs):
    pc, pr, *_ = pairs
    losses, c, r = preference_loss(pc, pr, pc, pr, loss_type="sigmoid", beta=0.1)
    np.testing.assert_array_equal(np.asarray(losses), np.float32(math.log(2)))
    assert not np.any(np.asarray(c)) and not np.any(np.asarray(r))


def test_exo_pair_defaults_epsilon_when_unsmoothed(pairs):
    pc, pr, rc, rr, lc, lr = pairs
    got = preference_loss(pc, pr, rc, rr, loss_type="exo_pair", beta=BETA)[0]
    np.testing.assert_allclose(np.asarray(got), reference("exo_pair", pc, pr, rc, rr, lc, lr, ls=1e-3), rtol=2e-5)


def test_mixture_is_the_weighted_sum(pairs):
    pc, pr, rc, rr, lc, lr = pairs
    got, c, _ = mixed_preference_loss(pc, pr, rc, rr, loss_types=("sigmoid", "hinge"),
                                      loss_weights=(0.8, 0.2), beta=BETA, chosen_lengths=lc, rejected_lengths=lr)
    want = 0.8 * reference("sigmoid", pc, pr, rc, rr, lc, lr, ls=0) + 0.2 * reference("hinge", pc, pr, rc, rr, lc, lr)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(c), BETA * (pc - rc), rtol=1e-5, atol=1e-5)


def test_length_normalised_losses_need_lengths(pairs):
    pc, pr, rc, rr, *_ = pairs
    with pytest.raises(ValueError, match="chosen_lengths"):
        preference_loss(pc, pr, rc, rr, loss_type="ipo", beta=BETA)
    with pytest.raises(ValueError, match="reference"):
        preference_loss(pc, pr, None, None, loss_type="sigmoid", beta=BETA)


def test_bradley_terry_with_margin_and_centering():
    rs = np.random.RandomState(1)
    c, r, m = rs.normal(size=8), rs.normal(size=8), rs.uniform(0, 1, 8)
    got = bradley_terry_loss(np.float32(c), np.float32(r), np.float32(m), center_rewards_coef=0.01)
    want = -logsig(c - r - m) + 0.01 * (c + r) ** 2
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
