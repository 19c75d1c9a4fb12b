"""The one table of rematerialisation policies: what the backward pass may keep instead of recomputing.

Keys are `maxlm.config.REMAT_NAMES` (the planner's memory model reads the same names); `none` means no remat.
"""

from __future__ import annotations

from typing import Any

import jax

REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # keep every activation: no recompute, most memory
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep every matmul output
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep weight-matmul outputs only
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer: least memory
}
