"""Static convolutions in the form each backend runs fastest, and the rule.

XLA:CPU's conv backward (and its depthwise conv altogether) is slow, so on
CPU `conv_general_dilated`, a drop-in for lax's that the models pass to
`nn.Conv`, computes the form `static_form` picks:

- 'matmul' (`pointwise_matmul_conv`): an ungrouped 1x1 conv as one matmul,
  whose kernel gradient is one matmul too;
- 'shifted' (`shifted_depthwise_conv`): a depthwise conv as k*k shifted
  multiply-adds with a written-out backward;
- 'im2col_grad' (`im2col_grad_conv`): an ungrouped k x k conv with at least
  `IM2COL_GRAD_MIN_OUTPUTS` output pixels in the batch, XLA's conv with its
  kernel gradient as one im2col matmul (XLA:CPU runs that long reduction as
  a conv window);
- 'xla': XLA's conv, for everything else and on every other backend (these
  forms were written for XLA:CPU; no accelerator measurement favours them).

The measurements behind each threshold are in docs/speed.md ("The rules").
The building blocks here (`kernel_taps`, `im2col_patches`, the shifted
depthwise form) also serve CondConv's per-example forms in `ops.py`.

Shapes: x [B, H, W, Cin] (NHWC); kernel [kh, kw, Cin/g, Cout] (HWIO).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax import lax

from condconv_jax import cpu_setup, target
from condconv_jax.geometry import ConvGeometry, PaddingLike, conv_geometry

DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
# B*Ho*Wo from which an ungrouped k x k conv's kernel gradient is an im2col
# matmul on CPU (docs/speed.md: slower below, faster above).
IM2COL_GRAD_MIN_OUTPUTS = 4096


def static_form(geom: ConvGeometry, backend: str, batch: int) -> str:
  """'matmul', 'shifted', 'im2col_grad' or 'xla': how `conv_general_dilated`
  computes this conv on `backend` (see the module doc)."""
  if backend != 'cpu' or geom.input_dilation != (1, 1):
    return 'xla'
  if geom.is_pointwise and geom.feature_group_count == 1:
    return 'matmul'
  if geom.is_depthwise:
    return 'shifted'
  out_h, out_w = geom.out_spatial
  # A symbolic batch (an export) gets XLA's conv: the two differ only in
  # the kernel gradient.
  if (geom.feature_group_count == 1 and isinstance(batch, int) and
      batch * out_h * out_w >= IM2COL_GRAD_MIN_OUTPUTS):
    return 'im2col_grad'
  return 'xla'


def depthwise_implementation(backend: str) -> str:
  """'shifted' where XLA's depthwise conv is slow (CPU), else 'xla'."""
  return 'shifted' if backend == 'cpu' else 'xla'


def static_conv(x: jax.Array, kernel: jax.Array, geom: ConvGeometry,
                precision=None) -> jax.Array:
  """XLA's convolution with the geometry's explicit padding."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=geom.strides, padding=geom.padding,
      lhs_dilation=geom.input_dilation, rhs_dilation=geom.kernel_dilation,
      dimension_numbers=DIMENSION_NUMBERS,
      feature_group_count=geom.feature_group_count, precision=precision)


def pointwise_matmul_conv(x: jax.Array, kernel: jax.Array, geom: ConvGeometry,
                          precision=None) -> jax.Array:
  """A 1x1 conv (any stride and padding, one group) as one 2-D matmul.

  x: [B, H, W, Cin], kernel: [1, 1, Cin, Cout] -> [B, Ho, Wo, Cout]. Its
  kernel gradient is then [Cin, B*H*W] @ [B*H*W, Cout]; XLA:CPU's conv
  backward instead re-lays out the activations for a B*H*W-window conv
  (docs/speed.md).
  """
  (_, _, tap), = kernel_taps(x, geom)
  batch, out_h, out_w, cin = tap.shape
  out = jnp.matmul(tap.reshape(-1, cin), kernel[0, 0], precision=precision)
  return out.reshape(batch, out_h, out_w, kernel.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def im2col_grad_conv(x: jax.Array, kernel: jax.Array, geom: ConvGeometry,
                     precision=None) -> jax.Array:
  """XLA's conv and input gradient, with the kernel gradient as one matmul.

  x: [B, H, W, Cin], kernel: [kh, kw, Cin, Cout] (one group). The kernel
  gradient is [kh*kw*Cin, B*Ho*Wo] @ [B*Ho*Wo, Cout] over im2col patches
  (recomputed from x in the backward, a kh*kw-times-larger buffer) instead
  of XLA:CPU's, which runs that B*Ho*Wo-long reduction as a conv window,
  slower once it is long (`static_form`). A custom VJP: reverse-mode only,
  like the shifted depthwise form.
  """
  return static_conv(x, kernel, geom, precision)


def _im2col_grad_forward(x, kernel, geom, precision):
  return static_conv(x, kernel, geom, precision), (x, kernel)


def _im2col_grad_backward(geom, precision, residuals, cotangent):
  x, kernel = residuals
  # The conv is linear in x: its transpose is XLA's input gradient, without
  # running the forward again (XLA drops it where x needs none).
  (dx,) = jax.linear_transpose(
      lambda x_: static_conv(x_, kernel, geom, precision), x)(cotangent)
  patches = im2col_patches(x, geom)
  d_kernel = jnp.matmul(patches.reshape(-1, patches.shape[-1]).T,
                        cotangent.reshape(-1, cotangent.shape[-1]),
                        precision=precision)
  return dx, d_kernel.reshape(kernel.shape).astype(kernel.dtype)


im2col_grad_conv.defvjp(_im2col_grad_forward, _im2col_grad_backward)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` with the faster forms for this backend.

  Same signature and result; for 2-D NHWC/HWIO convs it computes the form
  `static_form` picks (a matmul for 1x1, shifted multiply-adds for
  depthwise, XLA's conv with an im2col kernel gradient for large k x k,
  else XLA's conv). Pass it as `nn.Conv(conv_general_dilated=...)`:
  the module, its parameters and its initialization stay nn.Conv's.
  """
  fallback = functools.partial(
      lax.conv_general_dilated, lhs, rhs, window_strides, padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
  if (lhs.ndim != 4 or rhs.ndim != 4 or batch_group_count != 1 or
      preferred_element_type is not None or
      lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) !=
      lax.conv_dimension_numbers(lhs.shape, rhs.shape, DIMENSION_NUMBERS)):
    return fallback()
  cpu_setup.check_allocator()  # the zoo's static convs come through here
  geom = conv_geometry(lhs.shape, rhs.shape, strides=tuple(window_strides),
                       padding=padding, input_dilation=lhs_dilation or 1,
                       kernel_dilation=rhs_dilation or 1,
                       feature_group_count=feature_group_count)
  form = static_form(geom, target.backend(), lhs.shape[0])
  with jax.named_scope(f'static_conv_{form}'):  # names the ops in profiles
    if form == 'matmul':
      return pointwise_matmul_conv(lhs, rhs, geom, precision)
    if form == 'shifted':
      return shifted_depthwise_conv(lhs, rhs[None], geom)
    if form == 'im2col_grad':
      return im2col_grad_conv(lhs, rhs, geom, precision)
    return fallback()


def _padded_input(x: jax.Array, geom: ConvGeometry) -> jax.Array:
  """Applies padding and input dilation (interior padding) in one lax.pad."""
  (top, bottom), (left, right) = geom.padding
  dil_h, dil_w = geom.input_dilation
  if (top, bottom, left, right, dil_h, dil_w) == (0, 0, 0, 0, 1, 1):
    return x
  config = [(0, 0, 0), (top, bottom, dil_h - 1), (left, right, dil_w - 1),
            (0, 0, 0)]
  return lax.pad(x, jnp.zeros((), x.dtype), config)


def kernel_taps(x: jax.Array, geom: ConvGeometry
                ) -> Iterator[tuple[int, int, jax.Array]]:
  """Yields (i, j, tap): the input pixels tap (i, j) sees, [B, Ho, Wo, C].

  The conv is then sum_ij tap_ij @ K[i, j]; slicing a padded input is free of
  arithmetic, and autodiff turns it into pads of the cotangent.
  """
  padded = _padded_input(x, geom)
  out_h, out_w = geom.out_spatial
  stride_h, stride_w = geom.strides
  dil_h, dil_w = geom.kernel_dilation
  batch, _, _, channels = padded.shape
  for i in range(geom.kernel_size[0]):
    for j in range(geom.kernel_size[1]):
      start = (0, i * dil_h, j * dil_w, 0)
      limit = (batch, start[1] + (out_h - 1) * stride_h + 1,
               start[2] + (out_w - 1) * stride_w + 1, channels)
      if (start == (0, 0, 0, 0) and limit == padded.shape and
          geom.strides == (1, 1)):
        yield i, j, padded
      else:
        yield i, j, lax.slice(padded, start, limit, (1, stride_h, stride_w, 1))


def shifted_depthwise_conv(x: jax.Array, kernels: jax.Array,
                           geom: ConvGeometry) -> jax.Array:
  """Depthwise conv as k*k shifted multiply-adds.

  Args:
    x: [B, H, W, C].
    kernels: [B, kh, kw, 1, C*m] per-example kernels, or [1, kh, kw, 1, C*m]
      for one kernel shared by the batch (channel multiplier m).
  Returns:
    [B, Ho, Wo, C*m].

  XLA:CPU runs its own depthwise conv many times slower than this
  (docs/speed.md). The backward is written out too
  (`_shifted_depthwise_backward`): autodiff of the taps gives a sum of k*k
  pads of the cotangent, which XLA:CPU runs slower than the same sum
  written as slices of one padded cotangent.
  """
  if geom.input_dilation != (1, 1):
    return _shifted_depthwise_forward(x, kernels, geom)  # rare: autodiff
  return _shifted_depthwise_vjp(x, kernels, geom)


def _shifted_depthwise_forward(x, kernels, geom):
  multiplier = geom.out_features // geom.in_features
  # Low-precision inputs accumulate in float32; the chain of adds is fused into
  # one elementwise kernel, so the wider accumulator costs no memory traffic.
  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
  out = None
  for i, j, tap in kernel_taps(x, geom):
    if multiplier > 1:
      # Output channel o reads input channel o // m (lax's grouping order).
      tap = jnp.repeat(tap, multiplier, axis=-1)
    term = (tap.astype(acc_dtype) *
            kernels[:, i, j, 0, :].astype(acc_dtype)[:, None, None, :])
    out = term if out is None else out + term
  return out.astype(jnp.result_type(x.dtype, kernels.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shifted_depthwise_vjp(x, kernels, geom):
  return _shifted_depthwise_forward(x, kernels, geom)


def _shifted_depthwise_vjp_forward(x, kernels, geom):
  # Residuals are x and the kernels only: the taps are re-sliced in the
  # backward, which is cheaper than keeping k*k shifted copies alive.
  return _shifted_depthwise_forward(x, kernels, geom), (x, kernels)


def _shifted_depthwise_backward(geom, residuals, cotangent):
  """(dx, dkernels) of the shifted depthwise conv (input_dilation 1).

  dx is itself a shifted depthwise conv: the cotangent, dilated by the
  strides and padded once, read at k*k offsets against the flipped kernel.
  dkernels is one multiply-reduce per tap.
  """
  x, kernels = residuals
  acc_dtype = jnp.promote_types(cotangent.dtype, jnp.float32)
  batch, height, width, channels = x.shape
  multiplier = geom.out_features // geom.in_features
  kh, kw = geom.kernel_size
  (pad_h, _), (pad_w, _) = geom.padding
  dil_h, dil_w = geom.kernel_dilation
  stride_h, stride_w = geom.strides
  out_h, out_w = geom.out_spatial
  dy = cotangent.astype(acc_dtype)
  k = kernels.astype(acc_dtype)

  # One multiply-reduce per tap (XLA:CPU hands each to YNNPACK after copying
  # the tap out: about 4 activation-sized passes per tap, 70-75% of this
  # backward's time; fusing the taps into one pass measured slower).
  pixels = (0, 1, 2) if kernels.shape[0] == 1 else (1, 2)
  d_kernels = []
  for _, _, tap in kernel_taps(x, geom):
    if multiplier > 1:
      tap = jnp.repeat(tap, multiplier, axis=-1)
    d_kernels.append(jnp.sum(tap.astype(acc_dtype) * dy, axis=pixels))
  d_kernels = jnp.stack(d_kernels, axis=-2).reshape(kernels.shape)

  # Input pixel q (padded coordinate q + pad) receives dy[o] k[t] wherever
  # o * stride + t * dilation = q + pad: pad the stride-dilated dy so that
  # tap t reads it at offset (k - 1 - t) * dilation.
  low_h, low_w = (kh - 1) * dil_h - pad_h, (kw - 1) * dil_w - pad_w
  dilated_h, dilated_w = (out_h - 1) * stride_h + 1, (out_w - 1) * stride_w + 1
  config = [(0, 0, 0),
            (low_h, height + pad_h - dilated_h, stride_h - 1),
            (low_w, width + pad_w - dilated_w, stride_w - 1), (0, 0, 0)]
  padded = lax.pad(dy, jnp.zeros((), acc_dtype), config)
  dx = None
  for i in range(kh):
    for j in range(kw):
      top, left = (kh - 1 - i) * dil_h, (kw - 1 - j) * dil_w
      tap = lax.slice(padded, (0, top, left, 0),
                      (batch, top + height, left + width, padded.shape[3]))
      term = tap * k[:, i, j, 0, :][:, None, None, :]
      dx = term if dx is None else dx + term
  if multiplier > 1:
    dx = dx.reshape(batch, height, width, channels, multiplier).sum(-1)
  return dx.astype(x.dtype), d_kernels.astype(kernels.dtype)


_shifted_depthwise_vjp.defvjp(_shifted_depthwise_vjp_forward,
                              _shifted_depthwise_backward)


def im2col_patches(x: jax.Array, geom: ConvGeometry) -> jax.Array:
  """im2col: [B, H, W, Cin] -> [B, Ho*Wo, kh*kw*Cin], taps in HWIO order."""
  taps = [tap for _, _, tap in kernel_taps(x, geom)]
  patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  return patches.reshape(x.shape[0], -1, patches.shape[-1])


def depthwise_conv(x: jax.Array, kernel: jax.Array, *, strides=1,
                   padding: PaddingLike = 'SAME', input_dilation=1,
                   kernel_dilation=1, implementation: str = 'auto',
                   precision=None) -> jax.Array:
  """A static depthwise conv, x: [B, H, W, C], kernel: [kh, kw, 1, C*m].

  implementation: 'xla' (lax.conv), 'shifted' (k*k multiply-adds) or 'auto'
  (the faster one for the backend, `depthwise_implementation`).
  """
  if kernel.ndim != 4 or kernel.shape[2] != 1:
    raise ValueError(f'a depthwise kernel is [kh, kw, 1, C*multiplier], got '
                     f'shape {kernel.shape}.')
  geom = conv_geometry(x.shape, kernel.shape, strides=strides, padding=padding,
                       input_dilation=input_dilation,
                       kernel_dilation=kernel_dilation,
                       feature_group_count=x.shape[-1] if x.ndim == 4 else 1)
  if implementation == 'auto':
    implementation = depthwise_implementation(target.backend())
  if implementation not in ('xla', 'shifted'):
    raise ValueError(f"implementation must be 'auto', 'xla' or 'shifted', got "
                     f'{implementation!r}.')
  with jax.named_scope(f'static_conv_{implementation}'):  # names it in profiles
    if implementation == 'xla':
      return static_conv(x, kernel, geom, precision)
    return shifted_depthwise_conv(x, kernel[None], geom)
