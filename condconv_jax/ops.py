"""Pure functions for conditional convolutions (no Flax needed).

    y[b] = (sum_e r[b, e] W_e) * x[b] + sum_e r[b, e] bias_e

Every strategy computes exactly this function; they differ only in how the work
is laid out for the hardware (`strategy.py` holds the rule "auto" follows):

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
- "fused":   Pallas kernels (`fused.py`) that mix the expert tiles on-chip
             as they load them, so no mixed per-example kernel (or its
             gradient) is written to HBM; 1x1, depthwise and ungrouped k x k
             without dilation. Chosen only explicitly ("auto" never picks
             it: not measured yet); interpreted on CPU.
- "auto":    picks one of the above from the conv's shape and the backend.

Shapes: x [B, H, W, Cin] (NHWC); experts [E, kh, kw, Cin/g, Cout];
routing_weights [B, E]; bias [E, Cout].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from condconv_jax import fused, static_ops, target
from condconv_jax import strategy as strategy_lib
from condconv_jax.geometry import ConvGeometry, PaddingLike, conv_geometry


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
  for i, j, tap in static_ops.kernel_taps(x, geom):
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
  patches = static_ops.im2col_patches(x, geom)
  out = jnp.matmul(patches, flat, precision=precision)
  return out.reshape(batch, out_h, out_w, -1), (x, kernels)


def _matmul_conv_backward(geom, precision, residuals, cotangent):
  x, kernels = residuals
  batch = x.shape[0]
  patches, patches_pullback = jax.vjp(
      lambda x_: static_ops.im2col_patches(x_, geom), x)
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
  fast per pixel as the static conv (the vmapped grouped conv is far
  slower: docs/speed.md). Backward: the im2col/tap-matmul form, because
  XLA's gradient of a conv inside a loop is much slower than the static
  backward.
  """
  one = lambda xk: static_ops.static_conv(xk[0][None], xk[1], geom,
                                          precision)[0]
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
  one = lambda xb, kb: static_ops.static_conv(xb[None], kb, geom,
                                              precision)[0]
  return jax.vmap(one)(x, kernels)


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
  per_expert = static_ops.conv_general_dilated(
      x, wide, geom.strides, geom.padding, geom.input_dilation,
      geom.kernel_dilation, static_ops.DIMENSION_NUMBERS, groups,
      precision=precision)
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
  (_, _, tap), = static_ops.kernel_taps(x, geom)
  batch, out_h, out_w, cin = tap.shape
  num_experts, cout = experts.shape[0], experts.shape[-1]
  scaled = (tap[:, :, :, None, :] *
            routing_weights.astype(tap.dtype)[:, None, None, :, None])
  out = jnp.matmul(scaled.reshape(-1, num_experts * cin),
                   experts.reshape(num_experts * cin, cout),
                   precision=precision)
  return out.reshape(batch, out_h, out_w, cout)


def per_example_direct_conv(x: jax.Array, kernels: jax.Array,
                            geom: ConvGeometry, precision=None) -> jax.Array:
  """Per-example conv without a conv op: k*k shifted multiply-adds for
  depthwise, one im2col batched matmul for other ungrouped k x k, tap
  matmuls for 1x1 and grouped convs."""
  if geom.is_depthwise:
    return static_ops.shifted_depthwise_conv(x, kernels, geom)
  if geom.feature_group_count == 1 and not geom.is_pointwise:
    return per_example_matmul_conv(x, kernels, geom, precision)
  # 1x1: autodiff of the batched matmul measured 5-15% faster than the
  # written-out backward (7x7x2048->512 and 512->2048, batch 16).
  return tap_matmul_conv(x, kernels, geom, precision)


# The strategies that apply one mixed kernel per example (all but
# "experts"), by the per-example conv each runs.
PER_EXAMPLE_CONVS = {
    'vmap': per_example_vmap_conv,
    'direct': per_example_direct_conv,
    'loop': per_example_conv_loop,
}


def _mixed_kernel_strategy(name):
  def run(x, experts, routing_weights, geom, precision):
    kernels = mix_experts(routing_weights, experts, precision)
    return PER_EXAMPLE_CONVS[name](x, kernels, geom, precision)
  return run


_STRATEGY_FNS = {
    'experts': _experts_strategy,
    'fused': fused.fused_strategy,
    **{name: _mixed_kernel_strategy(name) for name in PER_EXAMPLE_CONVS},
}


def _checked_geometry(x, experts, strategy, **conv_args) -> ConvGeometry:
  strategy_lib.parse(strategy)  # a bad spec fails before any shape check
  if experts.ndim != 5:
    raise ValueError(f'experts must be [num_experts, kh, kw, Cin/g, Cout] '
                     f'(rank 5), got shape {experts.shape}.')
  geom = conv_geometry(x.shape, experts.shape[1:], **conv_args)
  if min(geom.out_spatial) < 1:
    raise ValueError(f'input spatial size {geom.in_spatial} is too small for '
                     f'kernel {geom.kernel_size} with padding {geom.padding} '
                     f'and kernel_dilation {geom.kernel_dilation}.')
  return geom


def _check_shape(name, array, shape, meaning):
  if tuple(array.shape) != tuple(shape):
    raise ValueError(f'{name} must be {meaning} = {tuple(shape)}, got shape '
                     f'{tuple(array.shape)}.')


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
  geom = _checked_geometry(x, experts, strategy, strides=strides,
                           padding=padding, input_dilation=input_dilation,
                           kernel_dilation=kernel_dilation,
                           feature_group_count=feature_group_count)
  batch, num_experts = x.shape[0], experts.shape[0]
  _check_shape('routing_weights', routing_weights, (batch, num_experts),
               '[batch, num_experts]')
  if bias is not None:
    _check_shape('bias', bias, (num_experts, geom.out_features),
                 '[num_experts, out_features]')
  strategy = strategy_lib.resolve(strategy, geom, batch, num_experts,
                                 target.backend())
  with jax.named_scope(f'conditional_conv_{strategy}'):
    out = _STRATEGY_FNS[strategy](x, experts, routing_weights, geom, precision)
  if bias is not None:
    out = out + mix_experts(routing_weights, bias, precision)[:, None, None, :]
  return out


def spatially_scaled_conv(x: jax.Array, kernel: jax.Array,
                          spatial_attention: jax.Array, geom: ConvGeometry,
                          precision=None) -> jax.Array:
  """One kernel whose k*k taps are scaled per example (ODConv with K = 1):
  y[b] = x[b] * (a_s[b] . W), without per-example kernels.

  The im2col patches of each example are scaled tap by tap, then ONE
  matmul with the static kernel [kh*kw*Cin, Cout]: the static conv's MACs,
  and a kernel gradient of the static kernel's size (one matmul), where the
  per-example forms write and reduce [B, kh, kw, Cin, Cout]. Ungrouped
  convs only.
  """
  batch, taps = x.shape[0], geom.kernel_size[0] * geom.kernel_size[1]
  out_h, out_w = geom.out_spatial
  patches = static_ops.im2col_patches(x, geom)  # [B, P, taps * Cin]
  scaled = (patches.reshape(batch, out_h * out_w, taps, -1) *
            spatial_attention.reshape(batch, 1, taps, 1).astype(x.dtype))
  out = jnp.matmul(scaled.reshape(patches.shape),
                   kernel.reshape(-1, kernel.shape[-1]), precision=precision)
  return out.reshape(batch, out_h, out_w, -1)


def omni_dimensional_conv(x: jax.Array, experts: jax.Array,
                          kernel_attention: jax.Array | None = None,
                          spatial_attention: jax.Array | None = None,
                          channel_attention: jax.Array | None = None,
                          filter_attention: jax.Array | None = None, *,
                          strides=1, padding: PaddingLike = 'SAME',
                          input_dilation=1, kernel_dilation=1,
                          feature_group_count: int = 1,
                          strategy: str = 'auto', precision=None
                          ) -> jax.Array:
  """ODConv's convolution (Li, Zhou, Yao, ICLR 2022) for given attentions:

      y[b] = ((x[b] * a_c[b]) * sum_k a_w[b, k] (a_s[b] . W_k)) * a_f[b]

  with a_c scaling the input channels, a_s the kernel taps, a_w mixing the
  K kernels and a_f scaling the output channels. An attention left None is
  one (ODConv skips the kernel attention for K = 1, the spatial one for 1x1
  and the filter one for depthwise convs).

  Args:
    x: [B, H, W, Cin]; experts: [K, kh, kw, Cin/g, Cout].
    kernel_attention: [B, K] (None only for K = 1).
    spatial_attention: [B, kh, kw]; channel_attention: [B, Cin];
    filter_attention: [B, Cout].
    strategy, the conv arguments, precision: as `conditional_conv`. With a
      spatial attention the kernel differs per example even for K = 1, so
      "experts" cannot express it; "auto" runs an ungrouped k x k conv
      with K = 1 as `spatially_scaled_conv` (no per-example kernels).
  Returns:
    [B, Ho, Wo, Cout].
  """
  conv_args = dict(strides=strides, padding=padding,
                   input_dilation=input_dilation,
                   kernel_dilation=kernel_dilation,
                   feature_group_count=feature_group_count)
  geom = _checked_geometry(x, experts, strategy, **conv_args)
  batch, num_experts = x.shape[0], experts.shape[0]
  if kernel_attention is None and num_experts != 1:
    raise ValueError(f'kernel_attention [batch, K] is needed to mix K = '
                     f'{num_experts} kernels; only K = 1 goes without.')
  for name, attention, shape, meaning in (
      ('kernel_attention', kernel_attention, (batch, num_experts),
       '[batch, K]'),
      ('spatial_attention', spatial_attention, (batch, *geom.kernel_size),
       '[batch, kh, kw]'),
      ('channel_attention', channel_attention, (batch, geom.in_features),
       '[batch, in_features]'),
      ('filter_attention', filter_attention, (batch, geom.out_features),
       '[batch, out_features]')):
    if attention is not None:
      _check_shape(name, attention, shape, meaning)
  if channel_attention is not None:
    x = x * channel_attention.astype(x.dtype)[:, None, None, :]
  if spatial_attention is None and kernel_attention is None:
    # K = 1, 1x1: the official `_forward_impl_pw1x`, one static conv.
    y = static_ops.conv_general_dilated(
        x, experts[0], geom.strides, geom.padding, geom.input_dilation,
        geom.kernel_dilation, static_ops.DIMENSION_NUMBERS,
        geom.feature_group_count, precision=precision)
  elif spatial_attention is None:
    y = conditional_conv(x, experts, kernel_attention, strategy=strategy,
                         precision=precision, **conv_args)
  elif (kernel_attention is None and strategy_lib.resolve(
      strategy, geom, batch, 1, target.backend(), spatial_only=True)
        == 'scaled_patches'):
    with jax.named_scope('omni_dimensional_conv_scaled_patches'):
      y = spatially_scaled_conv(x, experts[0], spatial_attention, geom,
                                precision)
  else:
    strategy = strategy_lib.resolve(strategy, geom, batch, num_experts,
                                   target.backend())
    if strategy not in PER_EXAMPLE_CONVS:
      raise ValueError(f'strategy {strategy!r} cannot apply a spatial '
                       f'attention (it makes one kernel per example): use '
                       f'one of {", ".join(PER_EXAMPLE_CONVS)} or auto for '
                       f'{strategy_lib.conv_kind(geom)} convs.')
    with jax.named_scope(f'omni_dimensional_conv_{strategy}'):
      if kernel_attention is None:
        kernels = jnp.broadcast_to(experts, (batch, *experts.shape[1:]))
      else:
        kernels = mix_experts(kernel_attention, experts, precision)
      kernels = kernels * spatial_attention.astype(
          kernels.dtype)[:, :, :, None, None]
      y = PER_EXAMPLE_CONVS[strategy](x, kernels, geom, precision)
  if filter_attention is not None:
    y = y * filter_attention.astype(y.dtype)[:, None, None, :]
  return y
