"""Pure functions for conditional convolutions (no Flax needed).

    y[b] = (sum_e r[b, e] W_e) * x[b] + sum_e r[b, e] bias_e

Every strategy computes exactly this function; they differ only in how the work
is laid out for the hardware (see `strategy.py` for the measured choice):

- "vmap":    mix one kernel per example, then vmap `lax.conv_general_dilated`
             over the batch (XLA lowers it to a grouped conv with B*g groups).
- "experts": the mixture-of-experts form sum_e r_e (W_e * x): all E expert
             convs as ONE wide grouped conv, then a weighted sum (1x1: one
             matmul of the routing-scaled inputs with the stacked experts).
             No per-example kernels, which is what runtimes that accept
             only constant weights need, and what a classifier (1x1
             spatial) runs fastest as.
- "direct":  mix one kernel per example, then apply it without a conv op:
             for 1x1 the batched matmul 'bhwc,bco->bhwo', for k x k one
             batched matmul over im2col patches, for depthwise k*k shifted
             multiply-adds; the last two with written-out backwards.
- "loop":    mix one kernel per example, then run one ordinary conv per
             example in a sequential loop; backward in the "direct" form.
- "auto":    picks one of the above from the conv's shape and the backend.

Static convs: `conv_general_dilated` is a drop-in for lax's that computes a
1x1 conv as one matmul, a depthwise conv in the shifted form and a large
k x k conv's kernel gradient as an im2col matmul on CPU, where XLA's own
conv backward is slow; the models pass it to nn.Conv.

Shapes: x [B, H, W, Cin] (NHWC); experts [E, kh, kw, Cin/g, Cout];
routing_weights [B, E]; bias [E, Cout].
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax import lax

from condconv_jax import strategy as strategy_lib
from condconv_jax.geometry import ConvGeometry, PaddingLike, conv_geometry

_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def mix_experts(routing_weights: jax.Array, experts: jax.Array,
                precision=None) -> jax.Array:
  """Per-example parameters: [B, E] x [E, ...] -> [B, ...].

  One [B, E] @ [E, P] matmul over the flattened experts, which is the layout
  the parameters are stored in, so no transpose is needed either way.
  """
  num_experts = experts.shape[0]
  # The scope names these ops in profiles (benchmarks/profile_step.py).
  with jax.named_scope('mix_experts'):
    flat = experts.reshape(num_experts, -1)
    mixed = jnp.matmul(routing_weights.astype(flat.dtype), flat,
                       precision=precision)
    return mixed.reshape(routing_weights.shape[0], *experts.shape[1:])


def static_conv(x: jax.Array, kernel: jax.Array, geom: ConvGeometry,
                precision=None) -> jax.Array:
  """XLA's convolution with the geometry's explicit padding."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=geom.strides, padding=geom.padding,
      lhs_dilation=geom.input_dilation, rhs_dilation=geom.kernel_dilation,
      dimension_numbers=_DIMENSION_NUMBERS,
      feature_group_count=geom.feature_group_count, precision=precision)


def pointwise_matmul_conv(x: jax.Array, kernel: jax.Array, geom: ConvGeometry,
                          precision=None) -> jax.Array:
  """A 1x1 conv (any stride and padding, one group) as one 2-D matmul.

  x: [B, H, W, Cin], kernel: [1, 1, Cin, Cout] -> [B, Ho, Wo, Cout]. Its
  kernel gradient is then [Cin, B*H*W] @ [B*H*W, Cout]; XLA:CPU's conv
  backward instead re-lays out the activations for a B*H*W-window conv,
  3-5x slower on EfficientNet's and ResNet's 1x1 layers (README).
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
  of XLA:CPU's, which runs that B*Ho*Wo-long reduction as a conv window and
  takes 1.4-2.8x longer once it is long (`strategy.static_form`). A custom
  VJP: reverse-mode only, like the shifted depthwise form.
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
  patches = _patches(x, geom)
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
  `strategy.static_form` picks (a matmul for 1x1, shifted multiply-adds for
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
      lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSION_NUMBERS)):
    return fallback()
  geom = conv_geometry(lhs.shape, rhs.shape, strides=tuple(window_strides),
                       padding=padding, input_dilation=lhs_dilation or 1,
                       kernel_dilation=rhs_dilation or 1,
                       feature_group_count=feature_group_count)
  form = strategy_lib.static_form(geom, jax.default_backend(), lhs.shape[0])
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
  """Yields (i, j, tap): the input pixels kernel tap (i, j) sees, [B, Ho, Wo, C].

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

  XLA:CPU runs its own depthwise conv 4-30x slower than this. The backward is
  written out too (`_shifted_depthwise_backward`): autodiff of the taps
  gives a sum of k*k pads of the cotangent, which XLA:CPU runs 3-8x slower
  than the same sum written as slices of one padded cotangent.
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


def tap_matmul_conv(x: jax.Array, kernels: jax.Array, geom: ConvGeometry,
                    precision=None) -> jax.Array:
  """Per-example (grouped) conv as a sum over taps of batched matmuls.

  Args:
    x: [B, H, W, Cin].
    kernels: [B, kh, kw, Cin/g, Cout].
  Returns:
    [B, Ho, Wo, Cout] = sum_ij tap_ij(x) @ kernels[:, i, j]. For a 1x1 conv
    this is the single batched matmul 'bhwc,bco->bhwo' ("direct" uses it
    for 1x1 and grouped convs). Differentiated by autodiff, its kernel
    gradient is a sum of kh*kw pads of a B*P-sized array, which is why k x k
    convs with one group take `per_example_matmul_conv` instead.
  """
  batch = x.shape[0]
  out_h, out_w = geom.out_spatial
  groups = geom.feature_group_count
  _, _, cin_g, cout = geom.kernel_shape
  out = None
  for i, j, tap in kernel_taps(x, geom):
    if groups == 1:
      # A plain 3-D batched matmul: XLA:CPU runs it ~3x faster than the same
      # contraction written with singleton group axes.
      term = jnp.matmul(tap.reshape(batch, out_h * out_w, cin_g),
                        kernels[:, i, j], precision=precision)
    else:
      term = jnp.einsum(
          'bpgc,bcgo->bpgo', tap.reshape(batch, out_h * out_w, groups, cin_g),
          kernels[:, i, j].reshape(batch, cin_g, groups, cout // groups),
          precision=precision)
    out = term if out is None else out + term
  return out.reshape(batch, out_h, out_w, cout)


def _patches(x: jax.Array, geom: ConvGeometry) -> jax.Array:
  """im2col: [B, H, W, Cin] -> [B, Ho*Wo, kh*kw*Cin], taps in HWIO order."""
  taps = [tap for _, _, tap in kernel_taps(x, geom)]
  patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  return patches.reshape(x.shape[0], -1, patches.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def per_example_matmul_conv(x: jax.Array, kernels: jax.Array,
                            geom: ConvGeometry, precision=None) -> jax.Array:
  """Per-example conv (one group) as one batched matmul over im2col patches.

  x: [B, H, W, Cin], kernels: [B, kh, kw, Cin, Cout] -> [B, Ho, Wo, Cout].
  For 1x1 the patches are x itself. The backward is written out so that
  the kernel gradient is one batched matmul writing [B, kh*kw*Cin, Cout]
  once; autodiff of a per-tap form builds it as a sum of kh*kw pads of
  that B*P-sized array (CC-ResNet-50's 3x3 layers: 9 x 151 MB at batch 16).
  Costs a kh*kw-times-larger patch buffer, recomputed in the backward.
  """
  return _matmul_conv_forward(x, kernels, geom, precision)[0]


def _matmul_conv_forward(x, kernels, geom, precision):
  batch = x.shape[0]
  out_h, out_w = geom.out_spatial
  flat = kernels.reshape(batch, -1, kernels.shape[-1])
  out = jnp.matmul(_patches(x, geom), flat, precision=precision)
  return out.reshape(batch, out_h, out_w, -1), (x, kernels)


def _matmul_conv_backward(geom, precision, residuals, cotangent):
  x, kernels = residuals
  batch = x.shape[0]
  patches, patches_pullback = jax.vjp(lambda x_: _patches(x_, geom), x)
  dy = cotangent.reshape(batch, -1, cotangent.shape[-1])
  flat = kernels.reshape(batch, -1, kernels.shape[-1])
  d_kernels = jnp.matmul(jnp.swapaxes(patches, 1, 2), dy, precision=precision)
  d_patches = lax.dot_general(dy, flat, (((2,), (2,)), ((0,), (0,))),
                              precision=precision)
  (dx,) = patches_pullback(d_patches.astype(patches.dtype))
  return dx, d_kernels.reshape(kernels.shape).astype(kernels.dtype)


per_example_matmul_conv.defvjp(_matmul_conv_forward, _matmul_conv_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def per_example_conv_loop(x: jax.Array, kernels: jax.Array,
                          geom: ConvGeometry, precision=None) -> jax.Array:
  """One ordinary conv per example, in a sequential loop over the batch.

  x: [B, H, W, Cin], kernels: [B, kh, kw, Cin/g, Cout] -> [B, Ho, Wo, Cout].
  Forward: each example is a batch-1 lax.conv, which XLA:CPU runs about as
  fast per pixel as the static conv (the vmapped grouped conv is 7-12x
  slower). Backward: the same function's tap-matmul form, because XLA's
  gradient of a conv inside a loop is ~25x slower than the static backward.
  """
  one = lambda xk: static_conv(xk[0][None], xk[1], geom, precision)[0]
  return lax.map(one, (x, kernels))


def _loop_forward(x, kernels, geom, precision):
  return per_example_conv_loop(x, kernels, geom, precision), (x, kernels)


def _loop_backward(geom, precision, residuals, cotangent):
  x, kernels = residuals
  # The conv is bilinear, so this pullback needs only x and kernels: XLA
  # drops the forward matmuls jax.vjp traces here, as nothing reads them.
  if geom.feature_group_count == 1 and not geom.is_pointwise:
    return _matmul_conv_backward(geom, precision, residuals, cotangent)
  _, pullback = jax.vjp(
      lambda x_, k_: tap_matmul_conv(x_, k_, geom, precision), x, kernels)
  return pullback(cotangent)


per_example_conv_loop.defvjp(_loop_forward, _loop_backward)


def per_example_vmap_conv(x: jax.Array, kernels: jax.Array,
                          geom: ConvGeometry, precision=None) -> jax.Array:
  """XLA's conv vmapped over examples: one grouped conv with B*g groups.

  x: [B, H, W, Cin], kernels: [B, kh, kw, Cin/g, Cout] -> [B, Ho, Wo, Cout].
  """
  one = lambda xb, kb: static_conv(xb[None], kb, geom, precision)[0]
  return jax.vmap(one)(x, kernels)


def _vmap_strategy(x, experts, routing_weights, geom, precision):
  kernels = mix_experts(routing_weights, experts, precision)
  return per_example_vmap_conv(x, kernels, geom, precision)


def _experts_strategy(x, experts, routing_weights, geom, precision):
  if geom.is_pointwise and geom.feature_group_count == 1:
    return _pointwise_experts(x, experts, routing_weights, geom, precision)
  num_experts, kh, kw, cin_g, cout = experts.shape
  groups = geom.feature_group_count
  cout_g = cout // groups
  # Output channels of a grouped conv are group-major, so the E experts go
  # inside each group: [kh, kw, Cin/g, g, E, Cout/g] -> one conv, E*Cout wide.
  wide = experts.reshape(num_experts, kh, kw, cin_g, groups, cout_g)
  wide = wide.transpose(1, 2, 3, 4, 0, 5).reshape(kh, kw, cin_g, -1)
  # One static conv E*Cout wide, in the backend's fastest form (shifted
  # multiply-adds for depthwise on CPU; ungrouped 1x1 took the branch above).
  per_expert = conv_general_dilated(
      x, wide, geom.strides, geom.padding, geom.input_dilation,
      geom.kernel_dilation, _DIMENSION_NUMBERS, groups, precision=precision)
  batch, out_h, out_w, _ = per_expert.shape
  per_expert = per_expert.reshape(batch, out_h, out_w, groups, num_experts,
                                  cout_g)
  out = jnp.einsum('bhwgeo,be->bhwgo', per_expert,
                   routing_weights.astype(per_expert.dtype),
                   precision=precision)
  return out.reshape(batch, out_h, out_w, cout)


def _pointwise_experts(x, experts, routing_weights, geom, precision):
  """The mixture of E 1x1 experts as one matmul over routing-scaled inputs.

  sum_e r_e (x W_e) = [r_1 x, ..., r_E x] @ [W_1; ...; W_E]: the stacked
  experts [E*Cin, Cout] are the parameter itself (no transpose), the MACs are
  E times the static conv's, and nothing of size B*Cin*Cout exists in either
  pass (the expert gradient is one [E*Cin, B*H*W] @ [B*H*W, Cout] matmul).
  For a classifier (1x1 spatial) that is exactly the kernel-mixing matmul's
  cost, without the per-example kernels and their gradients.
  """
  (_, _, tap), = kernel_taps(x, geom)
  batch, out_h, out_w, cin = tap.shape
  num_experts, cout = experts.shape[0], experts.shape[-1]
  scaled = (tap[:, :, :, None, :] *
            routing_weights.astype(tap.dtype)[:, None, None, :, None])
  out = jnp.matmul(scaled.reshape(-1, num_experts * cin),
                   experts.reshape(num_experts * cin, cout),
                   precision=precision)
  return out.reshape(batch, out_h, out_w, cout)


def _direct_strategy(x, experts, routing_weights, geom, precision):
  kernels = mix_experts(routing_weights, experts, precision)
  if geom.is_depthwise:
    return shifted_depthwise_conv(x, kernels, geom)
  if geom.feature_group_count == 1 and not geom.is_pointwise:
    return per_example_matmul_conv(x, kernels, geom, precision)
  # 1x1: autodiff of the batched matmul measured 5-15% faster than the
  # written-out backward (7x7x2048->512 and 512->2048, batch 16).
  return tap_matmul_conv(x, kernels, geom, precision)


def _loop_strategy(x, experts, routing_weights, geom, precision):
  kernels = mix_experts(routing_weights, experts, precision)
  return per_example_conv_loop(x, kernels, geom, precision)


_STRATEGY_FNS = {
    'vmap': _vmap_strategy,
    'experts': _experts_strategy,
    'direct': _direct_strategy,
    'loop': _loop_strategy,
}


def conditional_conv(x: jax.Array, experts: jax.Array,
                     routing_weights: jax.Array, bias: jax.Array | None = None,
                     *, strides=1, padding: PaddingLike = 'SAME',
                     input_dilation=1, kernel_dilation=1,
                     feature_group_count: int = 1, strategy: str = 'auto',
                     precision=None) -> jax.Array:
  """Applies a conditional convolution.

  Args:
    x: [B, H, W, Cin] input.
    experts: [E, kh, kw, Cin/g, Cout] expert kernels.
    routing_weights: [B, E] mixing weights, one row per example.
    bias: optional [E, Cout] expert biases, mixed with the same weights.
    strides, padding, input_dilation, kernel_dilation, feature_group_count:
      as in `flax.linen.Conv` ('SAME' is TensorFlow's SAME).
    strategy: one of `STRATEGIES` (see the module doc), or per conv kind
      with 'auto' for the rest, e.g. 'depthwise=vmap' (`strategy.parse`).
    precision: passed to the matmuls and convolutions.
  Returns:
    [B, Ho, Wo, Cout].
  """
  strategy_lib.parse(strategy)  # a bad spec fails before any shape check
  if experts.ndim != 5:
    raise ValueError(f'experts must be [num_experts, kh, kw, Cin/g, Cout] '
                     f'(rank 5), got shape {experts.shape}.')
  geom = conv_geometry(x.shape, experts.shape[1:], strides=strides,
                       padding=padding, input_dilation=input_dilation,
                       kernel_dilation=kernel_dilation,
                       feature_group_count=feature_group_count)
  batch, num_experts = x.shape[0], experts.shape[0]
  if routing_weights.shape != (batch, num_experts):
    raise ValueError(f'routing_weights must be [batch, num_experts] = '
                     f'{(batch, num_experts)}, got shape '
                     f'{routing_weights.shape}.')
  if bias is not None and bias.shape != (num_experts, geom.out_features):
    raise ValueError(f'bias must be [num_experts, out_features] = '
                     f'{(num_experts, geom.out_features)}, got shape '
                     f'{bias.shape}.')
  if min(geom.out_spatial) < 1:
    raise ValueError(f'input spatial size {geom.in_spatial} is too small for '
                     f'kernel {geom.kernel_size} with padding {geom.padding} '
                     f'and kernel_dilation {geom.kernel_dilation}.')
  strategy = strategy_lib.resolve(strategy, geom, batch, num_experts,
                                 jax.default_backend())
  with jax.named_scope(f'conditional_conv_{strategy}'):
    out = _STRATEGY_FNS[strategy](x, experts, routing_weights, geom, precision)
  if bias is not None:
    out = out + mix_experts(routing_weights, bias, precision)[:, None, None, :]
  return out


def depthwise_conv(x: jax.Array, kernel: jax.Array, *, strides=1,
                   padding: PaddingLike = 'SAME', input_dilation=1,
                   kernel_dilation=1, implementation: str = 'auto',
                   precision=None) -> jax.Array:
  """A static depthwise conv, x: [B, H, W, C], kernel: [kh, kw, 1, C*m].

  implementation: 'xla' (lax.conv), 'shifted' (k*k multiply-adds) or 'auto'
  (the faster one for the backend, see `strategy.depthwise_implementation`).
  """
  if kernel.ndim != 4 or kernel.shape[2] != 1:
    raise ValueError(f'a depthwise kernel is [kh, kw, 1, C*multiplier], got '
                     f'shape {kernel.shape}.')
  geom = conv_geometry(x.shape, kernel.shape, strides=strides, padding=padding,
                       input_dilation=input_dilation,
                       kernel_dilation=kernel_dilation,
                       feature_group_count=x.shape[-1] if x.ndim == 4 else 1)
  if implementation == 'auto':
    implementation = strategy_lib.depthwise_implementation(
        jax.default_backend())
  if implementation not in ('xla', 'shifted'):
    raise ValueError(f"implementation must be 'auto', 'xla' or 'shifted', got "
                     f'{implementation!r}.')
  with jax.named_scope(f'static_conv_{implementation}'):  # names it in profiles
    if implementation == 'xla':
      return static_conv(x, kernel, geom, precision)
    return shifted_depthwise_conv(x, kernel[None], geom)
