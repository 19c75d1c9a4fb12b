"""Evaluation: continuation log-likelihoods, multiple choice, win rate, `maxlm eval`, an lm-eval adapter."""
