"""What every loss shares: float32 masked sums and means."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]

_F32 = jnp.float32


def _f32(x) -> jax.Array:
  return jnp.asarray(x, _F32)


def masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Sum of x over entries where mask is nonzero (mask may be bool or a float weight)."""
  return jnp.sum(_f32(x) * _f32(mask))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of x over masked entries; 0 (not NaN) when the mask is empty."""
  n = jnp.sum(_f32(mask))
  return masked_sum(x, mask) / jnp.maximum(n, 1.0)
