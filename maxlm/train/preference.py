"""Preference losses on per-pair sequence log-probabilities: DPO and its variants, ORPO and SimPO.

Everything here is a pure function of `[pairs]` arrays, so it is tested against the formulas directly and used
unchanged by the jitted step. Inputs are *summed* response log-probabilities log pi(y|x) = sum_t log pi(y_t|x,y_<t);
the length-normalised losses divide by the response lengths themselves.

Notation (TRL, trl/trainer/dpo_trainer.py `dpo_loss`): with c = chosen, r = rejected,
    rho_c = log pi(c) - log ref(c),   rho_r = log pi(r) - log ref(r)   (the implicit rewards divided by beta)
    h     = rho_c - rho_r                                             (DPO's logit)
and s(x) = sigmoid(x), ls = label smoothing. Per pair:

    sigmoid       -(1-ls) log s(beta h) - ls log s(-beta h)          (Rafailov et al. 2023 eq. 7; cDPO with ls > 0)
    robust        (-(1-ls) log s(beta h) + ls log s(-beta h)) / (1 - 2 ls)         (Chowdhury et al. 2024, rDPO)
    hinge         max(0, 1 - beta h)                                  (SLiC, Zhao et al. 2023)
    ipo           (h_bar - 1/(2 beta))^2, h_bar with rho / length     (Azar et al. 2023 eq. 17; beta = tau)
    exo_pair      s(beta h)(log s(beta h) - log(1-eps)) + s(-beta h)(log s(-beta h) - log eps),
                  eps = ls or 1e-3                                    (Ji et al. 2024, EXO)
    nca_pair      -log s(beta rho_c) - 0.5 log s(-beta rho_c) - 0.5 log s(-beta rho_r)   (Chen et al. 2024, NCA)
    sppo_hard     (rho_c - 1/(2 beta))^2 + (rho_r + 1/(2 beta))^2    (Wu et al. 2024, SPPO with hard labels)
    apo_zero      (1 - s(beta rho_c)) + s(beta rho_r)                 (D'Oosterlinck et al. 2024, APO)
    apo_down      s(beta rho_c) + (1 - s(beta h))
    sigmoid_norm  -log s(beta h_bar), h_bar with rho / length          (TRL's length-normalised DPO)
  reference-free (the reference log-probs are ignored; lengths required):
    simpo         -(1-ls) log s(beta (m_c - m_r) - gamma) - ls log s(-(beta (m_c - m_r) - gamma)),
                  m = log pi / length                                 (Meng et al. 2024 eq. 6; TRL CPOTrainer)
    orpo          -m_c - beta log s(log odds(c) - log odds(r)),  odds(y) = e^m / (1 - e^m)
                                                                      (Hong et al. 2024 eq. 6-7; beta = lambda)

Rewards (the `rewards/*` metrics): beta * rho for the reference-based losses (TRL); beta * m for the reference-free
ones (TRL's CPO/ORPO trainers), since no reference exists there.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from maxlm.config.schema import PREFERENCE_LOSS_NAMES as LOSS_TYPES  # the names config validation accepts
from maxlm.config.schema import REFERENCE_FREE_NAMES as REFERENCE_FREE  # need no reference (dpo.reference: none)

LENGTH_NORMALISED = ("ipo", "sigmoid_norm", "orpo", "simpo")  # need chosen_lengths / rejected_lengths
SMOOTHED = ("sigmoid", "robust", "exo_pair", "simpo")  # read label_smoothing
EXO_DEFAULT_EPS = 1e-3  # TRL: exo_pair with label_smoothing 0 uses this epsilon


def _per_token(logps_P: jax.Array, lengths_P: jax.Array | None, loss_type: str, which: str) -> jax.Array:
    if lengths_P is None:
        raise ValueError(f"loss_type={loss_type!r} is length-normalised: pass {which}_lengths")
    return logps_P / jnp.maximum(lengths_P.astype(jnp.float32), 1.0)


def _log1m_exp(x: jax.Array) -> jax.Array:
    """log(1 - e^x) for x <= 0, accurate near 0 (log of -expm1) and far below it."""
    return jnp.log(-jnp.expm1(jnp.minimum(x, -1e-7)))


def preference_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
                    ref_chosen_logps: jax.Array | None, ref_rejected_logps: jax.Array | None, *, loss_type: str,
                    beta: float, label_smoothing: float = 0.0, chosen_lengths: jax.Array | None = None,
                    rejected_lengths: jax.Array | None = None, simpo_gamma: float = 0.5
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair `(losses, chosen_rewards, rejected_rewards)`, each [P], for one `loss_type` (formulas above).

    Log-probs are summed over response tokens; `*_lengths` are the response token counts (needed by ipo,
    sigmoid_norm, orpo, simpo). The reference log-probs may be None for orpo and simpo. Rewards carry no gradient.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    pc = policy_chosen_logps.astype(jnp.float32)
    pr = policy_rejected_logps.astype(jnp.float32)
    ls = float(label_smoothing)
    log_sig = jax.nn.log_sigmoid

    if loss_type in REFERENCE_FREE:
        mc = _per_token(pc, chosen_lengths, loss_type, "chosen")
        mr = _per_token(pr, rejected_lengths, loss_type, "rejected")
        if loss_type == "simpo":
            z = beta * (mc - mr) - simpo_gamma
            losses = -(1 - ls) * log_sig(z) - ls * log_sig(-z)
        else:  # orpo: the chosen NLL (per token) plus beta * the odds-ratio term
            log_odds = (mc - mr) - (_log1m_exp(mc) - _log1m_exp(mr))
            losses = -mc - beta * log_sig(log_odds)
        return losses, jax.lax.stop_gradient(beta * mc), jax.lax.stop_gradient(beta * mr)

    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss_type={loss_type!r} needs reference log-probs (only {REFERENCE_FREE} are "
                         "reference-free)")
    rho_c = pc - ref_chosen_logps.astype(jnp.float32)
    rho_r = pr - ref_rejected_logps.astype(jnp.float32)
    h = rho_c - rho_r
    if loss_type == "sigmoid":
        losses = -(1 - ls) * log_sig(beta * h) - ls * log_sig(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - ls) * log_sig(beta * h) + ls * log_sig(-beta * h)) / (1 - 2 * ls)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * h)
    elif loss_type == "exo_pair":
        eps = ls or EXO_DEFAULT_EPS
        z = beta * h
        losses = (jax.nn.sigmoid(z) * (log_sig(z) - math.log(1 - eps))
                  + jax.nn.sigmoid(-z) * (log_sig(-z) - math.log(eps)))
    elif loss_type == "nca_pair":
        losses = -log_sig(beta * rho_c) - 0.5 * log_sig(-beta * rho_c) - 0.5 * log_sig(-beta * rho_r)
    elif loss_type == "sppo_hard":
        losses = (rho_c - 0.5 / beta) ** 2 + (rho_r + 0.5 / beta) ** 2
    elif loss_type == "apo_zero":
        losses = (1 - jax.nn.sigmoid(beta * rho_c)) + jax.nn.sigmoid(beta * rho_r)
    elif loss_type == "apo_down":
        losses = jax.nn.sigmoid(beta * rho_c) + (1 - jax.nn.sigmoid(beta * h))
    else:  # ipo, sigmoid_norm: the log-ratios per response token
        h_bar = (_per_token(rho_c, chosen_lengths, loss_type, "chosen")
                 - _per_token(rho_r, rejected_lengths, loss_type, "rejected"))
        losses = (h_bar - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -log_sig(beta * h_bar)
    return losses, jax.lax.stop_gradient(beta * rho_c), jax.lax.stop_gradient(beta * rho_r)


def mixed_preference_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
                          ref_chosen_logps: jax.Array | None, ref_rejected_logps: jax.Array | None, *,
                          loss_types: tuple[str, ...], loss_weights: tuple[float, ...], beta: float,
                          label_smoothing: float = 0.0, chosen_lengths: jax.Array | None = None,
                          rejected_lengths: jax.Array | None = None, simpo_gamma: float = 0.5
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """sum_k weight_k * losses_k (TRL's list-valued `loss_type` with `loss_weights`); rewards of the first type."""
    total, rewards = None, None
    for kind, weight in zip(loss_types, loss_weights, strict=True):
        losses, rc, rr = preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                         ref_rejected_logps, loss_type=kind, beta=beta,
                                         label_smoothing=label_smoothing, chosen_lengths=chosen_lengths,
                                         rejected_lengths=rejected_lengths, simpo_gamma=simpo_gamma)
        total = weight * losses if total is None else total + weight * losses
        rewards = rewards or (rc, rr)
    return total, rewards[0], rewards[1]


def bradley_terry_loss(chosen_scores: jax.Array, rejected_scores: jax.Array, margin: jax.Array | None = None,
                       center_rewards_coef: float = 0.0) -> jax.Array:
    """Reward-model loss per pair: -log s(r_c - r_r - margin) + coef * (r_c + r_r)^2 (TRL reward_trainer.py;
    the centering term is Eisenstein et al. 2023's auxiliary loss, which pins the rewards' mean near 0)."""
    rc = chosen_scores.astype(jnp.float32)
    rr = rejected_scores.astype(jnp.float32)
    diff = rc - rr if margin is None else rc - rr - margin.astype(jnp.float32)
    losses = -jax.nn.log_sigmoid(diff)
    if center_rewards_coef:
        losses = losses + center_rewards_coef * (rc + rr) ** 2
    return losses
