"""Max pooling with a fast backward on CPU (ResNet's stem pooling).

    x = pooling.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

A drop-in for `flax.linen.max_pool`: same arguments, result and gradient
(each window's cotangent goes to the first of its maxima in row-major window
order, as XLA's select-and-scatter routes it). On CPU, for 4-D floating
inputs with explicit non-negative padding, it is the maximum of the k*k
strided slices of the (-inf) padded input, with the backward written as k*k
masked pads of the cotangent, because XLA:CPU's select-and-scatter backward
is several times slower (docs/speed.md). That form has a custom VJP
(reverse-mode only; a window holding a NaN sends its gradient to its first
NaN). Anything else is flax's (XLA's reduce-window).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from condconv_jax import static_ops, target
from condconv_jax.geometry import ConvGeometry, conv_geometry


def max_pool(inputs: jax.Array, window_shape, strides=None, padding='VALID'
             ) -> jax.Array:
  """`nn.max_pool(inputs, window_shape, strides, padding)`, faster on CPU,
  and in the form each export runtime's converter takes."""
  fallback = lambda: nn.max_pool(inputs, window_shape, strides=strides,
                                 padding=padding)
  if (inputs.ndim != 4 or len(window_shape) != 2 or
      isinstance(padding, str) or
      not jnp.issubdtype(inputs.dtype, jnp.floating)):
    return fallback()
  window = tuple(window_shape)
  strides = tuple(strides) if strides is not None else (1, 1)
  padding = tuple(tuple(pair) for pair in padding)
  if (len(strides) != 2 or min(strides) <= 0 or len(padding) != 2 or
      any(len(pair) != 2 or min(pair) < 0 for pair in padding) or
      min(_windows(inputs.shape, window, strides, padding).out_spatial) <= 0):
    return fallback()  # flax's result or flax's error
  backend = target.backend()
  # jax2onnx maps reduce_window to a MaxPool that ONNX Runtime rejects
  # ("Unsupported pooling size"); the shifted maxima export as Slice + Max.
  if backend in ('cpu', 'onnx'):
    return _shifted_max_pool(inputs, window, strides, padding)
  if backend in target.EXPORT_RUNTIMES:
    # The primitive itself, which the LiteRT converter makes MAX_POOL_2D.
    return lax.reduce_window(inputs, -jnp.inf, lax.max, (1, *window, 1),
                             (1, *strides, 1), ((0, 0), *padding, (0, 0)))
  return fallback()


def _windows(shape, window, strides, padding) -> ConvGeometry:
  """The pooling windows as a VALID conv over the padded input, whose taps
  `static_ops.kernel_taps` slices."""
  batch, height, width, channels = shape
  (top, bottom), (left, right) = padding
  return conv_geometry(
      (batch, height + top + bottom, width + left + right, channels),
      (*window, channels, channels), strides=strides, padding='VALID')


def _pad(x, padding, value):
  return lax.pad(x, jnp.array(value, x.dtype),
                 ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _shifted_max_pool(x, window, strides, padding):
  return _forward(x, window, strides, padding)[0]


def _forward(x, window, strides, padding):
  padded = _pad(x, padding, -jnp.inf)
  out = None
  for _, _, tap in static_ops.kernel_taps(
      padded, _windows(x.shape, window, strides, padding)):
    out = tap if out is None else jnp.maximum(out, tap)
  return out, (x, out)


def _backward(window, strides, padding, residuals, cotangent):
  x, out = residuals
  padded = _pad(x, padding, -jnp.inf)
  unclaimed = jnp.ones(out.shape, bool)  # windows whose maximum is not found
  d_padded = jnp.zeros(padded.shape, cotangent.dtype)
  for i, j, tap in static_ops.kernel_taps(
      padded, _windows(x.shape, window, strides, padding)):
    first = unclaimed & ((tap == out) | jnp.isnan(tap))
    unclaimed = unclaimed & ~first
    # Back to padded coordinates: offset (i, j), stride-1 zeros between.
    config = [(0, 0, 0)]
    for axis, offset in ((1, i), (2, j)):
      span = (out.shape[axis] - 1) * strides[axis - 1] + 1
      config.append((offset, padded.shape[axis] - offset - span,
                     strides[axis - 1] - 1))
    config.append((0, 0, 0))
    d_padded = d_padded + lax.pad(
        jnp.where(first, cotangent, 0), jnp.array(0, cotangent.dtype), config)
  (top, _), (left, _) = padding
  return (lax.slice(d_padded, (0, top, left, 0),
                    (x.shape[0], top + x.shape[1], left + x.shape[2],
                     x.shape[3])),)


_shifted_max_pool.defvjp(_forward, _backward)
