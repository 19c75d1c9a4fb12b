"""Decoding: the KV-cache engine, sampling, and the `maxlm generate` / `maxlm bench-generate` commands."""

from maxlm.generate.engine import Completion, Engine, Request
from maxlm.generate.sampling import SamplingParams

__all__ = ["Completion", "Engine", "Request", "SamplingParams"]
