"""Grouped matmul for XLA:CPU: `jax.lax.ragged_dot`'s semantics at the cost of the rows actually present.

XLA:CPU lowers `ragged_dot(x [M, D], w [E, D, F], group_sizes [E])` to one dense matmul of every row with every
group's weights (masked), E times the work; the MoE block's dropless path on CPU uses `tiled_grouped_matmul`
instead (megablox's gmm/tgmm scheme written in plain XLA ops, with a custom gradient). GPU/TPU keep ragged_dot.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp


def tile_rows(rows: int) -> int:
    """Tile height of `tiled_grouped_matmul`: 128 rows keep XLA:CPU's matmuls efficient (smaller tiles cost more per
    row than they save in padding), fewer for tiny inputs."""
    return int(min(128, max(8, 1 << max(rows - 1, 1).bit_length())))


class _Tiles(NamedTuple):
    """Rows sorted by group, cut into tiles of Q rows that never straddle two groups (a group's last tile may be
    partial): `locate(j)` gives tile j's group, first row and valid-row mask."""

    sizes_E: jax.Array
    count_E: jax.Array  # tiles per group: ceil(size / Q)
    end_E: jax.Array  # cumulative tile count
    row_start_E: jax.Array
    total: jax.Array  # tiles in use: the loop's (traced) trip count
    Q: int

    @staticmethod
    def plan(sizes_E: jax.Array, Q: int) -> _Tiles:
        count_E = (sizes_E + Q - 1) // Q
        end_E = jnp.cumsum(count_E)
        return _Tiles(sizes_E, count_E, end_E, jnp.cumsum(sizes_E) - sizes_E, end_E[-1], Q)

    def locate(self, j: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        e = jnp.sum(self.end_E <= j)  # searchsorted by comparison: one fusion, no loop (E is small)
        start = self.row_start_E[e] + (j - (self.end_E[e] - self.count_E[e])) * self.Q
        mask_Q = jnp.arange(self.Q) < self.row_start_E[e] + self.sizes_E[e] - start
        return e, start, mask_Q


def _gmm_forward(x_MD: jax.Array, w_EDF: jax.Array, sizes_E: jax.Array, Q: int, transpose_w: bool = False
                 ) -> jax.Array:
    """out[rows of group e] = x[rows of group e] @ w[e] (@ w[e]^T with `transpose_w`, read in place)."""
    M, D = x_MD.shape
    F = w_EDF.shape[1 if transpose_w else 2]
    contract = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))
    tiles = _Tiles.plan(sizes_E, Q)
    x_PD = jnp.pad(x_MD, ((0, Q), (0, 0)))  # P = M + Q: a partial last tile never reads out of bounds

    def body(j: jax.Array, out_PF: jax.Array) -> jax.Array:
        e, start, mask_Q = tiles.locate(j)
        x_QD = jax.lax.dynamic_slice_in_dim(x_PD, start, Q)
        y_QF = jax.lax.dot_general(x_QD, w_EDF[e], contract, preferred_element_type=jnp.float32).astype(out_PF.dtype)
        old_QF = jax.lax.dynamic_slice_in_dim(out_PF, start, Q)
        return jax.lax.dynamic_update_slice_in_dim(out_PF, jnp.where(mask_Q[:, None], y_QF, old_QF), start, 0)

    out_PF = jax.lax.fori_loop(0, tiles.total, body, jnp.zeros((M + Q, F), x_MD.dtype))
    return out_PF[:M]


def _gmm_weight_grad(x_MD: jax.Array, g_MF: jax.Array, sizes_E: jax.Array, Q: int) -> jax.Array:
    """dW[e] = x_e^T g_e over each group's rows (megablox's `tgmm`)."""
    E = sizes_E.shape[0]
    tiles = _Tiles.plan(sizes_E, Q)
    x_PD = jnp.pad(x_MD, ((0, Q), (0, 0)))
    g_PF = jnp.pad(g_MF, ((0, Q), (0, 0)))

    def body(j: jax.Array, dw_EDF: jax.Array) -> jax.Array:
        e, start, mask_Q = tiles.locate(j)
        x_QD = jnp.where(mask_Q[:, None], jax.lax.dynamic_slice_in_dim(x_PD, start, Q), 0)
        g_QF = jax.lax.dynamic_slice_in_dim(g_PF, start, Q)
        dw_DF = jnp.dot(x_QD.T, g_QF, preferred_element_type=jnp.float32)
        # dynamic_slice/update_slice rather than .at[e].add: the scatter it lowers to copies the carry on CPU.
        acc_1DF = jax.lax.dynamic_slice_in_dim(dw_EDF, e, 1) + dw_DF[None]
        return jax.lax.dynamic_update_slice_in_dim(dw_EDF, acc_1DF, e, 0)

    zeros = jnp.zeros((E, x_MD.shape[1], g_MF.shape[1]), jnp.float32)  # 16-bit sums over many tiles drift
    return jax.lax.fori_loop(0, tiles.total, body, zeros)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def tiled_grouped_matmul(x_MD: jax.Array, w_EDF: jax.Array, sizes_E: jax.Array, tile: int) -> jax.Array:
    """`jax.lax.ragged_dot` for XLA:CPU, which lowers ragged_dot to a dense matmul over all E groups.

    A loop over the tiles in use (the trip count is traced: no shape depends on the data) runs one [Q, D] x [D, F]
    matmul per tile, so the work is the real rows plus at most one partial tile per group, whatever the buffer
    size: the padding of the expert-parallel exchange costs nothing. Gradients are the same loops
    (dx = gmm(g, w^T), dw = per-group x^T g), as megablox's gmm/tgmm. Rows past sum(sizes) come out 0.
    """
    return _gmm_forward(x_MD, w_EDF, sizes_E, tile)


def _tgm_fwd(x_MD: jax.Array, w_EDF: jax.Array, sizes_E: jax.Array, tile: int
             ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    return _gmm_forward(x_MD, w_EDF, sizes_E, tile), (x_MD, w_EDF, sizes_E)


def _tgm_bwd(tile: int, res: tuple[jax.Array, jax.Array, jax.Array], g_MF: jax.Array
             ) -> tuple[jax.Array, jax.Array, None]:
    x_MD, w_EDF, sizes_E = res
    dx_MD = _gmm_forward(g_MF, w_EDF, sizes_E, tile, transpose_w=True)
    return dx_MD, _gmm_weight_grad(x_MD, g_MF, sizes_E, tile).astype(w_EDF.dtype), None


tiled_grouped_matmul.defvjp(_tgm_fwd, _tgm_bwd)
