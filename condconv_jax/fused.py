"""The "fused" CondConv strategy: Pallas kernels that mix the experts as they
load them, so the mixed per-example kernel sum_e r[b, e] W_e is never written
to HBM (nor is its gradient).

    y[b] = (sum_e r[b, e] W_e) * x[b]

Three kernel families, each a forward and a written-out backward
(`jax.custom_vjp`) with gradients for x, the experts and the routing weights
(the bias is mixed outside the strategy, in `ops.conditional_conv`, and
differentiated there by autodiff):

- pointwise (ungrouped 1x1): a GEMM per example, [P, Cin] @ W_b[Cin, Cout],
  on a grid (batch, pixel tiles, Cout tiles, Cin tiles); each step loads the
  E expert tiles [E, bk, bn] and mixes them on-chip in float32.
- depthwise k x k (any channel multiplier): per-example taps; each step
  loads the E experts' [kh, kw, bc] channel tiles, mixes them, and runs
  the kh*kw shifted multiply-adds over the whole (padded) image.
- regular (ungrouped) k x k: an implicit GEMM: a loop over the kh*kw taps
  inside the kernel, each a [Ho*Wo, bk] @ [bk, bn] matmul of a shifted
  window of the image with that tap's mixed tile, accumulated in float32.

Backward, in the same three families:

- dx: the transposed conv with the same mixed tiles (mixed again on-chip),
  scatter-added tap by tap into a float32 image block.
- experts and routing weights: per example b and tile, the kernel gradient
  G_b = sum_pixels patch^T dy is formed on-chip only; the kernel adds
  r[b, e] G_b into the float32 expert-gradient tile (a reduction over the
  batch and pixel-tile grid axes) and writes the partial inner products
  <W_e, G_b> for this tile; a small XLA sum over the tiles of those
  partials ([tiles..., B, E] floats) gives dL/dr. Nothing of size
  B * kh * kw * Cin * Cout is written.

Done in plain XLA, outside the kernels (and differentiated by autodiff):
the spatial padding, the stride's space-to-depth split of the padded image
into strides[0]*strides[1] phases (so every tap is a contiguous static
window of one phase), the 1x1's strided subsampling, the depthwise channel
multiplier's `jnp.repeat` of the input channels, the casts of the float32
dx / expert-gradient outputs to the input dtypes, and the sum of the
routing-gradient partials.

Accumulation is float32. Inputs and experts may be bfloat16: the mixed tile
is formed in float32 and cast to the input dtype for the matmuls (float32
accumulation), and the output has the dtype of x and the experts combined,
as in the other strategies.

Two forms of the same kernels (`form`):

- 'tpu' (Mosaic), the default off GPU and the one interpreted on CPU: blocks
  that divide their dimension (or are the whole of it), routing weights in
  SMEM, reductions over grid axes that revisit the same output block
  (dimension semantics 'arbitrary'), the backward's accumulators float32
  output blocks cast in XLA.
- 'gpu' (Triton), the default on GPU: Triton runs grid programs in parallel
  and wants power-of-two array sizes, so every reduction is an in-kernel
  loop (over the input channels, the taps, and in the expert gradient over
  the batch and pixel tiles) and every array is padded in XLA to whole
  power-of-two tiles (see `_gpu_form`). A 1x1 runs as the k x k kernel
  with one tap (a GEMM per example); each tap reads a contiguous row range
  of the flattened padded image, the output computed Wq (not Wo) pixels
  wide and cropped in XLA.

Both forms are checked in interpret mode on CPU against a float64
reference (tests/test_fused.py) and lowered for their platform on a CPU host
(TPU: Mosaic's tpu_custom_call; GPU: Triton). Neither has run on a TPU or a
GPU: see docs/speed.md, "The fused strategy".

Unsupported geometries (kernel or input dilation, grouped convs that are
not depthwise) raise a ValueError naming the strategies that take them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from condconv_jax.geometry import ConvGeometry

F32 = jnp.float32

# Default block sizes, used where they divide the dimension (else the whole
# dimension is one block): multiples of (8, 128) as Mosaic wants for the last
# two block dimensions, and large enough to keep the MXU busy.
DEFAULT_BLOCK_P = 512   # output pixels per 1x1 GEMM tile
DEFAULT_BLOCK_K = 512   # input channels per tile (the GEMMs' contraction)
DEFAULT_BLOCK_N = 256   # output channels per tile
DEFAULT_BLOCK_C = 128   # depthwise channels per tile


@dataclasses.dataclass(frozen=True)
class _Config:
  """A kernel call's static facts (hashable: custom_vjp's nondiff arg)."""
  kernel_size: tuple[int, int]
  strides: tuple[int, int]
  out_spatial: tuple[int, int]
  phase_spatial: tuple[int, int]   # (Hq, Wq), each phase of the padded image
  block_p: int
  block_k: int
  block_n: int
  out_dtype: Any
  precision: Any
  interpret: Any

  @property
  def taps(self):
    """(i, j, phase, row offset, column offset) for each tap."""
    (kh, kw), (sh, sw) = self.kernel_size, self.strides
    return [(i, j, (i % sh) * sw + j % sw, i // sh, j // sw)
            for i in range(kh) for j in range(kw)]


def _block(dim: int, requested: int | None, default: int, name: str) -> int:
  if requested is None:
    return default if dim % default == 0 else dim
  if requested < 1 or dim % requested:
    raise ValueError(f'{name}={requested} must be a positive divisor of the '
                     f'dimension it tiles ({dim}).')
  return requested


def _interpret_mode(interpret):
  if interpret is None:
    return jax.default_backend() == 'cpu'
  return interpret


def _call(kernel, out_shape, grid, in_specs, out_specs, semantics, config,
          name):
  params = None
  if not config.interpret or isinstance(config.interpret,
                                        pltpu.InterpretParams):
    params = pltpu.CompilerParams(dimension_semantics=semantics)
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid,
                        in_specs=in_specs, out_specs=out_specs,
                        interpret=config.interpret, compiler_params=params,
                        name=name)


def _smem_spec():
  """The routing weights [B, E], whole, as scalars (TPU: SMEM)."""
  return pl.BlockSpec(memory_space=pltpu.SMEM)


def _mix(r_ref, b, w_ref, index, num_experts):
  """sum_e r[b, e] * w_ref[(e, *index)] in float32: one mixed tile."""
  mixed = r_ref[b, 0] * w_ref[(0, *index)].astype(F32)
  for e in range(1, num_experts):
    mixed = mixed + r_ref[b, e] * w_ref[(e, *index)].astype(F32)
  return mixed


def _store(ref, value, reduce_axes, first):
  """Writes value into ref, or adds it over the reduction grid axes."""
  if not reduce_axes:
    ref[...] = value.astype(ref.dtype)
    return
  @pl.when(first)
  def _():
    ref[...] = jnp.zeros(ref.shape, ref.dtype)
  ref[...] += value.astype(ref.dtype)


def _first(*axes):
  cond = pl.program_id(axes[0]) == 0
  for axis in axes[1:]:
    cond = jnp.logical_and(cond, pl.program_id(axis) == 0)
  return cond


def _lane_vector(values, size):
  """[(1, 1) float32 arrays] -> (1, size), built with iota/where (no
  scalar stores into vectors)."""
  lanes = lax.broadcasted_iota(jnp.int32, (1, size), 1)
  out = jnp.zeros((1, size), F32)
  for e, value in enumerate(values):
    out = jnp.where(lanes == e, value, out)
  return out


def _sum_all(a):
  """Sum of a 2-D array as (1, 1)."""
  return jnp.sum(jnp.sum(a, axis=0, keepdims=True), axis=1, keepdims=True)


# --------------------------------------------------------------------------
# Plain-XLA preparation: padding and the stride's phase split.

def _phase_spatial(geom: ConvGeometry) -> tuple[int, int]:
  (kh, kw), (sh, sw) = geom.kernel_size, geom.strides
  out_h, out_w = geom.out_spatial
  return out_h + (kh - 1) // sh, out_w + (kw - 1) // sw


def _phases(x: jax.Array, geom: ConvGeometry) -> jax.Array:
  """x [B, H, W, C] -> [B, sh*sw, Hq, Wq, C]: the padded image split by
  row and column phase, padded[s*q + p] = phases[p][q]. Tap (i, j) at output
  (oh, ow) reads phase (i % sh, j % sw) at (oh + i // sh, ow + j // sw).
  Padding that the conv never reads is cropped (negative high padding)."""
  batch, h, w, c = x.shape
  (sh, sw), ((lo_h, _), (lo_w, _)) = geom.strides, geom.padding
  hq, wq = _phase_spatial(geom)
  padded = lax.pad(x, jnp.zeros((), x.dtype),
                   [(0, 0, 0), (lo_h, sh * hq - h - lo_h, 0),
                    (lo_w, sw * wq - w - lo_w, 0), (0, 0, 0)])
  phases = padded.reshape(batch, hq, sh, wq, sw, c)
  return phases.transpose(0, 2, 4, 1, 3, 5).reshape(batch, sh * sw, hq, wq, c)


# --------------------------------------------------------------------------
# Pointwise: a GEMM per example.
# x [B, P, K], experts [E, K, N], r [B, E] float32 -> y [B, P, N].

def _pw_forward_kernel(r_ref, x_ref, w_ref, o_ref, *, config, num_experts,
                       reduce_k):
  b = pl.program_id(0)
  mixed = _mix(r_ref, b, w_ref, (slice(None), slice(None)), num_experts)
  x = x_ref[0]
  acc = jnp.dot(x, mixed.astype(x.dtype), precision=config.precision,
                preferred_element_type=F32)
  _store(o_ref.at[0], acc, reduce_k, _first(3))


def _pw_dx_kernel(r_ref, dy_ref, w_ref, dx_ref, *, config, num_experts,
                  reduce_n):
  b = pl.program_id(0)
  mixed = _mix(r_ref, b, w_ref, (slice(None), slice(None)), num_experts)
  dy = dy_ref[0]
  acc = lax.dot_general(dy, mixed.astype(dy.dtype), (((1,), (1,)), ((), ())),
                        precision=config.precision,
                        preferred_element_type=F32)
  _store(dx_ref.at[0], acc, reduce_n, _first(3))


def _pw_dw_kernel(r_ref, x_ref, dy_ref, w_ref, dw_ref, dr_ref, *, config,
                  num_experts):
  b = pl.program_id(2)
  # This example's kernel gradient on this tile: on-chip only.
  grad = lax.dot_general(x_ref[0], dy_ref[0], (((0,), (0,)), ((), ())),
                         precision=config.precision,
                         preferred_element_type=F32)
  @pl.when(_first(2, 3))
  def _():
    dw_ref[...] = jnp.zeros(dw_ref.shape, dw_ref.dtype)
  for e in range(num_experts):
    dw_ref[e] += r_ref[b, e] * grad
  dr_ref[0, 0, 0, 0] = _lane_vector(
      [_sum_all(w_ref[e].astype(F32) * grad) for e in range(num_experts)],
      num_experts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _pointwise(x, experts, r, config):
  return _pw_forward(x, experts, r, config)


def _pw_forward(x, experts, r, config):
  batch, pixels, k = x.shape
  num_experts, _, n = experts.shape
  bp, bk, bn = config.block_p, config.block_k, config.block_n
  grid_p, grid_k, grid_n = pixels // bp, k // bk, n // bn
  out_dtype = F32 if grid_k > 1 else config.out_dtype
  y = _call(
      functools.partial(_pw_forward_kernel, config=config,
                        num_experts=num_experts, reduce_k=grid_k > 1),
      jax.ShapeDtypeStruct((batch, pixels, n), out_dtype),
      (batch, grid_p, grid_n, grid_k),
      [_smem_spec(),
       pl.BlockSpec((1, bp, bk), lambda b, p, j, i: (b, p, i)),
       pl.BlockSpec((num_experts, bk, bn), lambda b, p, j, i: (0, i, j))],
      pl.BlockSpec((1, bp, bn), lambda b, p, j, i: (b, p, j)),
      ('parallel', 'parallel', 'parallel', 'arbitrary'), config,
      'condconv_fused_pointwise')(r, x, experts)
  return y.astype(config.out_dtype)


def _pw_fwd(x, experts, r, config):
  return _pw_forward(x, experts, r, config), (x, experts, r)


def _pw_bwd(config, residuals, dy):
  x, experts, r = residuals
  batch, pixels, k = x.shape
  num_experts, _, n = experts.shape
  bp, bk, bn = config.block_p, config.block_k, config.block_n
  grid_p, grid_k, grid_n = pixels // bp, k // bk, n // bn
  dy = dy.astype(x.dtype)
  dx = _call(
      functools.partial(_pw_dx_kernel, config=config, num_experts=num_experts,
                        reduce_n=grid_n > 1),
      jax.ShapeDtypeStruct((batch, pixels, k), F32 if grid_n > 1 else x.dtype),
      (batch, grid_p, grid_k, grid_n),
      [_smem_spec(),
       pl.BlockSpec((1, bp, bn), lambda b, p, i, j: (b, p, j)),
       pl.BlockSpec((num_experts, bk, bn), lambda b, p, i, j: (0, i, j))],
      pl.BlockSpec((1, bp, bk), lambda b, p, i, j: (b, p, i)),
      ('parallel', 'parallel', 'parallel', 'arbitrary'), config,
      'condconv_fused_pointwise_dx')(r, dy, experts)
  d_experts, dr_parts = _call(
      functools.partial(_pw_dw_kernel, config=config,
                        num_experts=num_experts),
      (jax.ShapeDtypeStruct((num_experts, k, n), F32),
       jax.ShapeDtypeStruct((grid_k, grid_n, batch, grid_p, 1, num_experts),
                            F32)),
      (grid_k, grid_n, batch, grid_p),
      [_smem_spec(),
       pl.BlockSpec((1, bp, bk), lambda i, j, b, p: (b, p, i)),
       pl.BlockSpec((1, bp, bn), lambda i, j, b, p: (b, p, j)),
       pl.BlockSpec((num_experts, bk, bn), lambda i, j, b, p: (0, i, j))],
      (pl.BlockSpec((num_experts, bk, bn), lambda i, j, b, p: (0, i, j)),
       pl.BlockSpec((1, 1, 1, 1, 1, num_experts),
                    lambda i, j, b, p: (i, j, b, p, 0, 0))),
      ('parallel', 'parallel', 'arbitrary', 'arbitrary'), config,
      'condconv_fused_pointwise_dw')(r, x, dy, experts)
  # XLA: the routing gradient's partials, summed over the tiles.
  dr = dr_parts.sum(axis=(0, 1, 3, 4))
  return (dx.astype(x.dtype), d_experts.astype(experts.dtype),
          dr.astype(r.dtype))


_pointwise.defvjp(_pw_fwd, _pw_bwd)


# --------------------------------------------------------------------------
# Regular k x k: an implicit GEMM over the taps.
# xph [B, S, Hq, Wq, K] (phases), experts [E, kh, kw, K, N] -> [B, Ho, Wo, N].

def _kxk_forward_kernel(r_ref, x_ref, w_ref, o_ref, *, config, num_experts,
                        reduce_k):
  b = pl.program_id(0)
  out_h, out_w = config.out_spatial
  acc = None
  for i, j, phase, qi, qj in config.taps:
    mixed = _mix(r_ref, b, w_ref, (i, j), num_experts)   # [bk, bn], f32
    window = x_ref[0, phase, qi:qi + out_h, qj:qj + out_w, :]
    window = window.reshape(out_h * out_w, window.shape[-1])
    term = jnp.dot(window, mixed.astype(window.dtype),
                   precision=config.precision, preferred_element_type=F32)
    acc = term if acc is None else acc + term
  _store(o_ref.at[0], acc.reshape(out_h, out_w, acc.shape[-1]), reduce_k,
         _first(2))


def _kxk_dx_kernel(r_ref, dy_ref, w_ref, dx_ref, *, config, num_experts):
  b = pl.program_id(0)
  out_h, out_w = config.out_spatial
  dy = dy_ref[0].reshape(out_h * out_w, dy_ref.shape[-1])
  @pl.when(_first(2))
  def _():
    dx_ref[...] = jnp.zeros(dx_ref.shape, dx_ref.dtype)
  for i, j, phase, qi, qj in config.taps:
    mixed = _mix(r_ref, b, w_ref, (i, j), num_experts)   # [bk, bn]
    term = lax.dot_general(dy, mixed.astype(dy.dtype),
                           (((1,), (1,)), ((), ())),
                           precision=config.precision,
                           preferred_element_type=F32)
    dx_ref[0, phase, qi:qi + out_h, qj:qj + out_w, :] += term.reshape(
        out_h, out_w, term.shape[-1])


def _kxk_dw_kernel(r_ref, x_ref, dy_ref, w_ref, dw_ref, dr_ref, *, config,
                   num_experts):
  b = pl.program_id(2)
  out_h, out_w = config.out_spatial
  dy = dy_ref[0].reshape(out_h * out_w, dy_ref.shape[-1])
  @pl.when(_first(2))
  def _():
    dw_ref[...] = jnp.zeros(dw_ref.shape, dw_ref.dtype)
  partials = [None] * num_experts
  for i, j, phase, qi, qj in config.taps:
    window = x_ref[0, phase, qi:qi + out_h, qj:qj + out_w, :]
    window = window.reshape(out_h * out_w, window.shape[-1])
    # This example's kernel gradient for tap (i, j) on this tile: on-chip.
    grad = lax.dot_general(window, dy, (((0,), (0,)), ((), ())),
                           precision=config.precision,
                           preferred_element_type=F32)
    for e in range(num_experts):
      dw_ref[e, i, j] += r_ref[b, e] * grad
      part = _sum_all(w_ref[e, i, j].astype(F32) * grad)
      partials[e] = part if partials[e] is None else partials[e] + part
  dr_ref[0, 0, 0] = _lane_vector(partials, num_experts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kxk(xph, experts, r, config):
  return _kxk_forward(xph, experts, r, config)


def _kxk_forward(xph, experts, r, config):
  batch, phases, hq, wq, k = xph.shape
  num_experts, kh, kw, _, n = experts.shape
  out_h, out_w = config.out_spatial
  bk, bn = config.block_k, config.block_n
  grid_k, grid_n = k // bk, n // bn
  y = _call(
      functools.partial(_kxk_forward_kernel, config=config,
                        num_experts=num_experts, reduce_k=grid_k > 1),
      jax.ShapeDtypeStruct((batch, out_h, out_w, n),
                           F32 if grid_k > 1 else config.out_dtype),
      (batch, grid_n, grid_k),
      [_smem_spec(),
       pl.BlockSpec((1, phases, hq, wq, bk),
                    lambda b, j, i: (b, 0, 0, 0, i)),
       pl.BlockSpec((num_experts, kh, kw, bk, bn),
                    lambda b, j, i: (0, 0, 0, i, j))],
      pl.BlockSpec((1, out_h, out_w, bn), lambda b, j, i: (b, 0, 0, j)),
      ('parallel', 'parallel', 'arbitrary'), config, 'condconv_fused_kxk')(r, xph, experts)
  return y.astype(config.out_dtype)


def _kxk_fwd(xph, experts, r, config):
  return _kxk_forward(xph, experts, r, config), (xph, experts, r)


def _kxk_bwd(config, residuals, dy):
  xph, experts, r = residuals
  batch, phases, hq, wq, k = xph.shape
  num_experts, kh, kw, _, n = experts.shape
  out_h, out_w = config.out_spatial
  bk, bn = config.block_k, config.block_n
  grid_k, grid_n = k // bk, n // bn
  dy = dy.astype(xph.dtype)
  dxph = _call(
      functools.partial(_kxk_dx_kernel, config=config,
                        num_experts=num_experts),
      jax.ShapeDtypeStruct(xph.shape, F32),
      (batch, grid_k, grid_n),
      [_smem_spec(),
       pl.BlockSpec((1, out_h, out_w, bn), lambda b, i, j: (b, 0, 0, j)),
       pl.BlockSpec((num_experts, kh, kw, bk, bn),
                    lambda b, i, j: (0, 0, 0, i, j))],
      pl.BlockSpec((1, phases, hq, wq, bk), lambda b, i, j: (b, 0, 0, 0, i)),
      ('parallel', 'parallel', 'arbitrary'), config, 'condconv_fused_kxk_dx')(r, dy, experts)
  d_experts, dr_parts = _call(
      functools.partial(_kxk_dw_kernel, config=config,
                        num_experts=num_experts),
      (jax.ShapeDtypeStruct(experts.shape, F32),
       jax.ShapeDtypeStruct((grid_k, grid_n, batch, 1, num_experts), F32)),
      (grid_k, grid_n, batch),
      [_smem_spec(),
       pl.BlockSpec((1, phases, hq, wq, bk), lambda i, j, b: (b, 0, 0, 0, i)),
       pl.BlockSpec((1, out_h, out_w, bn), lambda i, j, b: (b, 0, 0, j)),
       pl.BlockSpec((num_experts, kh, kw, bk, bn),
                    lambda i, j, b: (0, 0, 0, i, j))],
      (pl.BlockSpec((num_experts, kh, kw, bk, bn),
                    lambda i, j, b: (0, 0, 0, i, j)),
       pl.BlockSpec((1, 1, 1, 1, num_experts), lambda i, j, b: (i, j, b, 0, 0))),
      ('parallel', 'parallel', 'arbitrary'), config, 'condconv_fused_kxk_dw')(r, xph, dy, experts)
  dr = dr_parts.sum(axis=(0, 1, 3))  # XLA: partials over the tiles
  return (dxph.astype(xph.dtype), d_experts.astype(experts.dtype),
          dr.astype(r.dtype))


_kxk.defvjp(_kxk_fwd, _kxk_bwd)


# --------------------------------------------------------------------------
# Depthwise: per-example taps, mixing and taps in one kernel.
# xph [B, S, Hq, Wq, C] (channels already repeated for a multiplier),
# experts [E, kh, kw, C] -> [B, Ho, Wo, C].

def _dw_forward_kernel(r_ref, x_ref, w_ref, o_ref, *, config, num_experts):
  b = pl.program_id(0)
  out_h, out_w = config.out_spatial
  acc = None
  for i, j, phase, qi, qj in config.taps:
    mixed = _mix(r_ref, b, w_ref, (i, pl.ds(j, 1), slice(None)),
                 num_experts)                              # [1, bc], f32
    window = x_ref[0, phase, qi:qi + out_h, qj:qj + out_w, :].astype(F32)
    term = window * mixed
    acc = term if acc is None else acc + term
  o_ref[0] = acc.astype(o_ref.dtype)


def _dw_dx_kernel(r_ref, dy_ref, w_ref, dx_ref, *, config, num_experts):
  b = pl.program_id(0)
  out_h, out_w = config.out_spatial
  dy = dy_ref[0].astype(F32)
  dx_ref[...] = jnp.zeros(dx_ref.shape, dx_ref.dtype)
  for i, j, phase, qi, qj in config.taps:
    mixed = _mix(r_ref, b, w_ref, (i, pl.ds(j, 1), slice(None)), num_experts)
    dx_ref[0, phase, qi:qi + out_h, qj:qj + out_w, :] += dy * mixed


def _dw_dw_kernel(r_ref, x_ref, dy_ref, w_ref, dw_ref, dr_ref, *, config,
                  num_experts):
  b = pl.program_id(1)
  out_h, out_w = config.out_spatial
  dy = dy_ref[0].astype(F32)
  @pl.when(_first(1))
  def _():
    dw_ref[...] = jnp.zeros(dw_ref.shape, dw_ref.dtype)
  partials = [None] * num_experts
  for i, j, phase, qi, qj in config.taps:
    window = x_ref[0, phase, qi:qi + out_h, qj:qj + out_w, :].astype(F32)
    # This example's tap gradient, [1, bc]: on-chip only.
    grad = jnp.sum(window * dy, axis=0).sum(axis=0, keepdims=True)
    for e in range(num_experts):
      dw_ref[e, i, pl.ds(j, 1), :] += r_ref[b, e] * grad
      part = jnp.sum(w_ref[e, i, pl.ds(j, 1), :].astype(F32) * grad, axis=1,
                     keepdims=True)
      partials[e] = part if partials[e] is None else partials[e] + part
  dr_ref[0, 0] = _lane_vector(partials, num_experts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _depthwise(xph, experts, r, config):
  return _dw_forward(xph, experts, r, config)


def _dw_forward(xph, experts, r, config):
  batch, phases, hq, wq, c = xph.shape
  num_experts, kh, kw, _ = experts.shape
  out_h, out_w = config.out_spatial
  bc = config.block_n
  return _call(
      functools.partial(_dw_forward_kernel, config=config,
                        num_experts=num_experts),
      jax.ShapeDtypeStruct((batch, out_h, out_w, c), config.out_dtype),
      (batch, c // bc),
      [_smem_spec(),
       pl.BlockSpec((1, phases, hq, wq, bc), lambda b, j: (b, 0, 0, 0, j)),
       pl.BlockSpec((num_experts, kh, kw, bc), lambda b, j: (0, 0, 0, j))],
      pl.BlockSpec((1, out_h, out_w, bc), lambda b, j: (b, 0, 0, j)),
      ('parallel', 'parallel'), config, 'condconv_fused_depthwise')(r, xph, experts)


def _dw_fwd(xph, experts, r, config):
  return _dw_forward(xph, experts, r, config), (xph, experts, r)


def _dw_bwd(config, residuals, dy):
  xph, experts, r = residuals
  batch, phases, hq, wq, c = xph.shape
  num_experts, kh, kw, _ = experts.shape
  out_h, out_w = config.out_spatial
  bc = config.block_n
  dxph = _call(
      functools.partial(_dw_dx_kernel, config=config,
                        num_experts=num_experts),
      jax.ShapeDtypeStruct(xph.shape, F32),
      (batch, c // bc),
      [_smem_spec(),
       pl.BlockSpec((1, out_h, out_w, bc), lambda b, j: (b, 0, 0, j)),
       pl.BlockSpec((num_experts, kh, kw, bc), lambda b, j: (0, 0, 0, j))],
      pl.BlockSpec((1, phases, hq, wq, bc), lambda b, j: (b, 0, 0, 0, j)),
      ('parallel', 'parallel'), config, 'condconv_fused_depthwise_dx')(r, dy, experts)
  d_experts, dr_parts = _call(
      functools.partial(_dw_dw_kernel, config=config,
                        num_experts=num_experts),
      (jax.ShapeDtypeStruct(experts.shape, F32),
       jax.ShapeDtypeStruct((c // bc, batch, 1, num_experts), F32)),
      (c // bc, batch),
      [_smem_spec(),
       pl.BlockSpec((1, phases, hq, wq, bc), lambda j, b: (b, 0, 0, 0, j)),
       pl.BlockSpec((1, out_h, out_w, bc), lambda j, b: (b, 0, 0, j)),
       pl.BlockSpec((num_experts, kh, kw, bc), lambda j, b: (0, 0, 0, j))],
      (pl.BlockSpec((num_experts, kh, kw, bc), lambda j, b: (0, 0, 0, j)),
       pl.BlockSpec((1, 1, 1, num_experts), lambda j, b: (j, b, 0, 0))),
      ('parallel', 'arbitrary'), config, 'condconv_fused_depthwise_dw')(r, xph, dy, experts)
  dr = dr_parts.sum(axis=(0, 2))  # XLA: partials over the channel tiles
  return (dxph.astype(xph.dtype), d_experts.astype(experts.dtype),
          dr.astype(r.dtype))


_depthwise.defvjp(_dw_fwd, _dw_bwd)


# --------------------------------------------------------------------------
# The GPU (Triton) form. Triton runs grid programs in parallel and wants
# every loaded or stored array to have a power-of-two size, so here every
# reduction is a loop inside the kernel and every array is padded (in XLA)
# to whole power-of-two tiles, so no load is out of bounds:
# - the image: phases flattened to rows of Wq pixels, xf [B, S, L, Kp];
#   the output is computed on the Ho x Wq grid (the Wq - Wo extra columns
#   are sliced off in XLA), so tap (i, j) is the contiguous row range
#   starting at off = (i // sh) * Wq + j // sw of its phase;
# - channels to whole tiles (Kp, Np), pixels to whole tiles (Pp, L);
# - the experts to [E, kh, kw, Kp, Np] (XLA: one padded copy per call).
# The same kernels run in interpret mode on CPU (the tests), and lower to
# Triton on a CPU host (tests: lowering_platforms=('cuda',)); they have never
# run on a GPU.

DEFAULT_GPU_BLOCK_P = 64
DEFAULT_GPU_BLOCK_K = 32
DEFAULT_GPU_BLOCK_N = 64   # output channels (depthwise: channels)


def _pow2_block(requested, default, name):
  block = default if requested is None else requested
  if block < 1 or block & (block - 1):
    raise ValueError(f'{name}={block} must be a power of two on GPU '
                     '(Triton).')
  return block


def _round_up(n, m):
  return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class _GpuConfig:
  kernel_size: tuple[int, int]
  strides: tuple[int, int]
  phase_spatial: tuple[int, int]   # (Hq, Wq)
  pixels: int                      # Pp: padded output rows (Ho * Wq)
  rows: int                        # L: padded rows of each phase
  block_p: int
  block_k: int
  block_n: int
  depthwise: bool
  out_dtype: Any
  precision: Any
  interpret: Any

  @property
  def taps(self):
    """(i, j, phase, row offset in the flattened phase) for each tap."""
    (kh, kw), (sh, sw), wq = (self.kernel_size, self.strides,
                              self.phase_spatial[1])
    return [(i, j, (i % sh) * sw + j % sw, (i // sh) * wq + j // sw)
            for i in range(kh) for j in range(kw)]

  @property
  def max_offset(self):
    return max(off for *_, off in self.taps)

  def tap_of(self, t):
    """Traced tap index -> (i, j, phase, offset), for the gradient grid."""
    (_, kw), (sh, sw), wq = (self.kernel_size, self.strides,
                             self.phase_spatial[1])
    i, j = t // kw, t % kw
    return i, j, (i % sh) * sw + j % sw, (i // sh) * wq + j // sw


def _gpu_call(kernel, out_shape, grid, in_specs, out_specs, config, name):
  params = None
  if not config.interpret:
    params = pltriton.CompilerParams(num_warps=4, num_stages=2)
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid,
                        in_specs=in_specs, out_specs=out_specs,
                        interpret=config.interpret, compiler_params=params,
                        name=name)


def _gpu_mix(r_ref, b, w_ref, index, num_experts):
  mixed = r_ref[b, 0] * w_ref[(0, *index)].astype(F32)
  for e in range(1, num_experts):
    mixed = mixed + r_ref[b, e] * w_ref[(e, *index)].astype(F32)
  return mixed


def _gpu_forward_kernel(r_ref, x_ref, w_ref, o_ref, *, config, num_experts):
  b, p = pl.program_id(0), pl.program_id(1)
  bp, bk = config.block_p, config.block_k
  if config.depthwise:   # x [1, S, L, bc], w [E, kh, kw, bc]
    acc = jnp.zeros((bp, config.block_n), F32)
    for i, j, phase, off in config.taps:
      mixed = _gpu_mix(r_ref, b, w_ref, (i, pl.ds(j, 1), slice(None)),
                       num_experts)
      acc += x_ref[0, phase, pl.ds(p * bp + off, bp), :].astype(F32) * mixed
    o_ref[0] = acc.astype(o_ref.dtype)
    return
  # x [1, S, L, Kp], w [E, kh, kw, Kp, bn]: an implicit GEMM, taps x K tiles.
  acc = jnp.zeros((bp, config.block_n), F32)
  for i, j, phase, off in config.taps:
    def step(kc, acc, i=i, j=j, phase=phase, off=off):
      window = x_ref[0, phase, pl.ds(p * bp + off, bp), pl.ds(kc * bk, bk)]
      mixed = _gpu_mix(r_ref, b, w_ref, (i, j, pl.ds(kc * bk, bk),
                                         slice(None)), num_experts)
      return acc + jnp.dot(window, mixed.astype(window.dtype),
                           precision=config.precision,
                           preferred_element_type=F32)
    acc = lax.fori_loop(0, x_ref.shape[-1] // bk, step, acc)
  o_ref[0] = acc.astype(o_ref.dtype)


def _gpu_dx_kernel(r_ref, dy_ref, w_ref, dx_ref, *, config, num_experts):
  """dx of phase s at row q: the taps of phase s, reading dy at
  q - off (dy is front-padded by max_offset rows)."""
  b, q = pl.program_id(0), pl.program_id(1)
  bp, bn = config.block_p, config.block_n
  shift = config.max_offset
  width = dx_ref.shape[-1]
  for s in range(dx_ref.shape[1]):
    acc = jnp.zeros((bp, width), F32)
    for i, j, phase, off in config.taps:
      if phase != s:
        continue
      start = q * bp + shift - off
      if config.depthwise:   # dy [1, R, bc], w [E, kh, kw, bc]
        mixed = _gpu_mix(r_ref, b, w_ref, (i, pl.ds(j, 1), slice(None)),
                         num_experts)
        acc += dy_ref[0, pl.ds(start, bp), :].astype(F32) * mixed
        continue
      def step(nc, acc, i=i, j=j, start=start):   # dy [1, R, Np]
        grad = dy_ref[0, pl.ds(start, bp), pl.ds(nc * bn, bn)]
        mixed = _gpu_mix(r_ref, b, w_ref, (i, j, slice(None),
                                           pl.ds(nc * bn, bn)), num_experts)
        return acc + lax.dot_general(
            grad, mixed.astype(grad.dtype), (((1,), (1,)), ((), ())),
            precision=config.precision, preferred_element_type=F32)
      acc = lax.fori_loop(0, dy_ref.shape[-1] // bn, step, acc)
    dx_ref[0, s] = acc.astype(dx_ref.dtype)


def _gpu_dw_kernel(r_ref, x_ref, dy_ref, w_ref, dw_ref, dr_ref, *, config,
                   num_experts):
  """One tap and channel tile: loops over the batch and the pixel tiles;
  per example the tap's kernel gradient G_b stays in registers."""
  _, _, phase, off = config.tap_of(pl.program_id(0))
  bp = config.block_p
  batch = x_ref.shape[0]
  # This tap's expert tiles: (bk, bn); depthwise (1, bc).
  tile = (0, pl.ds(0, 1), slice(None)) if config.depthwise else (0, 0)
  weights = [w_ref[(e, *tile)].astype(F32) for e in range(num_experts)]
  shape = weights[0].shape

  def example(b, sums):
    def pixels(pc, grad):
      window = x_ref[b, phase, pl.ds(pc * bp + off, bp), :]
      d = dy_ref[b, pl.ds(pc * bp, bp), :]
      if config.depthwise:
        return grad + jnp.sum(window.astype(F32) * d.astype(F32), axis=0,
                              keepdims=True)
      return grad + lax.dot_general(
          window, d, (((0,), (0,)), ((), ())), precision=config.precision,
          preferred_element_type=F32)
    grad = lax.fori_loop(0, config.pixels // bp, pixels,
                         jnp.zeros(shape, F32))
    for e in range(num_experts):
      dr_ref[0, 0, 0, b, e] = jnp.sum(weights[e] * grad)
    return tuple(total + r_ref[b, e] * grad
                 for e, total in enumerate(sums))

  sums = lax.fori_loop(0, batch, example,
                       tuple(jnp.zeros(shape, F32)
                             for _ in range(num_experts)))
  for e in range(num_experts):
    dw_ref[(e, *tile)] = sums[e]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gpu_conv(xf, experts, r, config):
  return _gpu_forward(xf, experts, r, config)


def _gpu_w_spec(config, experts_shape, channel_axis_tile):
  """Experts' block: channel tile j of the last axis."""
  num_experts, kh, kw = experts_shape[:3]
  if config.depthwise:
    return pl.BlockSpec((num_experts, kh, kw, config.block_n),
                        lambda *g: (0, 0, 0, g[channel_axis_tile]))
  return pl.BlockSpec((num_experts, kh, kw, experts_shape[3], config.block_n),
                      lambda *g: (0, 0, 0, 0, g[channel_axis_tile]))


def _gpu_forward(xf, experts, r, config):
  batch, phases, rows, k = xf.shape
  n = experts.shape[-1]
  bp, bn = config.block_p, config.block_n
  x_block = (1, phases, rows, bn if config.depthwise else k)
  return _gpu_call(
      functools.partial(_gpu_forward_kernel, config=config,
                        num_experts=experts.shape[0]),
      jax.ShapeDtypeStruct((batch, config.pixels, n), config.out_dtype),
      (batch, config.pixels // bp, n // bn),
      [pl.BlockSpec(r.shape, lambda b, p, j: (0, 0)),
       pl.BlockSpec(x_block, (lambda b, p, j: (b, 0, 0, j)) if config.depthwise
                    else (lambda b, p, j: (b, 0, 0, 0))),
       _gpu_w_spec(config, experts.shape, 2)],
      pl.BlockSpec((1, bp, bn), lambda b, p, j: (b, p, j)), config,
      'condconv_fused_gpu')(r, xf, experts)


def _gpu_fwd(xf, experts, r, config):
  return _gpu_forward(xf, experts, r, config), (xf, experts, r)


def _gpu_bwd(config, residuals, dy):
  xf, experts, r = residuals
  batch, phases, rows, k = xf.shape
  num_experts, kh, kw = experts.shape[:3]
  n = experts.shape[-1]
  bp, bk, bn = config.block_p, config.block_k, config.block_n
  # XLA: dy front-padded by the largest tap offset (and to the image's rows),
  # so every tap of dx reads in bounds.
  dy = dy.astype(xf.dtype)
  dy_front = jnp.pad(dy, ((0, 0), (config.max_offset,
                                   rows - config.pixels), (0, 0)))
  if config.depthwise:
    dx_in = [pl.BlockSpec((1, dy_front.shape[1], bn),
                          lambda b, q, i: (b, 0, i)),
             _gpu_w_spec(config, experts.shape, 2)]
    dx_out = pl.BlockSpec((1, phases, bp, bn), lambda b, q, i: (b, 0, q, i))
    dx_grid = (batch, rows // bp, k // bn)
  else:
    dx_in = [pl.BlockSpec((1, dy_front.shape[1], n),
                          lambda b, q, i: (b, 0, 0)),
             pl.BlockSpec((num_experts, kh, kw, bk, n),
                          lambda b, q, i: (0, 0, 0, i, 0))]
    dx_out = pl.BlockSpec((1, phases, bp, bk), lambda b, q, i: (b, 0, q, i))
    dx_grid = (batch, rows // bp, k // bk)
  dxf = _gpu_call(
      functools.partial(_gpu_dx_kernel, config=config,
                        num_experts=num_experts),
      jax.ShapeDtypeStruct(xf.shape, xf.dtype), dx_grid,
      [pl.BlockSpec(r.shape, lambda *g: (0, 0)), *dx_in], dx_out, config,
      'condconv_fused_gpu_dx')(r, dy_front, experts)
  taps = kh * kw
  grid_k, grid_n = (1, n // bn) if config.depthwise else (k // bk, n // bn)
  if config.depthwise:
    x_spec = pl.BlockSpec((batch, phases, rows, bn),
                          lambda t, i, j: (0, 0, 0, j))
    w_spec = pl.BlockSpec((num_experts, 1, 1, bn),
                          lambda t, i, j: (0, t // kw, t % kw, j))
  else:
    x_spec = pl.BlockSpec((batch, phases, rows, bk),
                          lambda t, i, j: (0, 0, 0, i))
    w_spec = pl.BlockSpec((num_experts, 1, 1, bk, bn),
                          lambda t, i, j: (0, t // kw, t % kw, i, j))
  d_experts, dr_parts = _gpu_call(
      functools.partial(_gpu_dw_kernel, config=config,
                        num_experts=num_experts),
      (jax.ShapeDtypeStruct(experts.shape, F32),
       jax.ShapeDtypeStruct((taps, grid_k, grid_n, batch, num_experts), F32)),
      (taps, grid_k, grid_n),
      [pl.BlockSpec(r.shape, lambda *g: (0, 0)), x_spec,
       pl.BlockSpec((batch, config.pixels, bn), lambda t, i, j: (0, 0, j)),
       w_spec],
      (w_spec, pl.BlockSpec((1, 1, 1, batch, num_experts),
                            lambda t, i, j: (t, i, j, 0, 0))),
      config, 'condconv_fused_gpu_dw')(r, xf, dy, experts)
  dr = dr_parts.sum(axis=(0, 1, 2))  # XLA: partials over taps and tiles
  return dxf, d_experts.astype(experts.dtype), dr.astype(r.dtype)


_gpu_conv.defvjp(_gpu_fwd, _gpu_bwd)


def _gpu_form(x, experts, r, geom, out_dtype, precision, interpret, block_p,
              block_k, block_n):
  """XLA padding and flattening around `_gpu_conv` (see above)."""
  depthwise = geom.is_depthwise
  batch, cin, cout = x.shape[0], x.shape[-1], experts.shape[-1]
  num_experts, kh, kw = experts.shape[:3]
  bp = _pow2_block(block_p, DEFAULT_GPU_BLOCK_P, 'block_p')
  bk = _pow2_block(block_k, DEFAULT_GPU_BLOCK_K, 'block_k')
  bn = _pow2_block(block_n, DEFAULT_GPU_BLOCK_N, 'block_n')
  hq, wq = _phase_spatial(geom)
  out_h, out_w = geom.out_spatial
  pixels = _round_up(out_h * wq, bp)
  partial = _GpuConfig(geom.kernel_size, geom.strides, (hq, wq), pixels, 0,
                       bp, bk, bn, depthwise, out_dtype, precision, interpret)
  rows = _round_up(max(hq * wq, pixels + partial.max_offset), bp)
  config = dataclasses.replace(partial, rows=rows)
  xph = _phases(x, geom)
  if depthwise:
    multiplier = cout // cin
    if multiplier > 1:  # XLA: output channel c*m + k reads input channel c
      xph = jnp.repeat(xph, multiplier, axis=-1)
    k_pad = n_pad = _round_up(cout, bn)
    w = experts.reshape(num_experts, kh, kw, cout)
    w = jnp.pad(w, ((0, 0), (0, 0), (0, 0), (0, n_pad - cout)))
  else:
    k_pad, n_pad = _round_up(cin, bk), _round_up(cout, bn)
    w = jnp.pad(experts, ((0, 0), (0, 0), (0, 0), (0, k_pad - cin),
                          (0, n_pad - cout)))
  phases = xph.shape[1]
  xf = xph.reshape(batch, phases, hq * wq, -1)
  xf = jnp.pad(xf, ((0, 0), (0, 0), (0, rows - hq * wq),
                    (0, k_pad - xf.shape[-1])))
  y = _gpu_conv(xf, w, r, config)   # [B, Pp, Np]
  y = y[:, :out_h * wq, :cout].reshape(batch, out_h, wq, cout)
  return y[:, :, :out_w]


# --------------------------------------------------------------------------

def check_supported(geom: ConvGeometry) -> None:
  """Raises ValueError for a geometry the fused kernels do not take."""
  others = "use strategy 'direct' (or 'auto') for it"
  if geom.input_dilation != (1, 1) or geom.kernel_dilation != (1, 1):
    raise ValueError(f"strategy 'fused' does not take input_dilation or "
                     f'kernel_dilation (got {geom.input_dilation}, '
                     f'{geom.kernel_dilation}); {others}.')
  if geom.feature_group_count > 1 and not geom.is_depthwise:
    raise ValueError(f"strategy 'fused' takes ungrouped and depthwise convs, "
                     f'not feature_group_count={geom.feature_group_count} '
                     f'with {geom.in_features} input channels; {others}.')


def fused_conditional_conv(x: jax.Array, experts: jax.Array,
                           routing_weights: jax.Array, geom: ConvGeometry,
                           precision=None, *, interpret=None,
                           form: str | None = None,
                           block_p: int | None = None,
                           block_k: int | None = None,
                           block_n: int | None = None) -> jax.Array:
  """sum_e r[b, e] W_e applied to x[b], by the fused Pallas kernels.

  Args:
    x: [B, H, W, Cin]; experts: [E, kh, kw, Cin/g, Cout];
    routing_weights: [B, E]; geom: the conv's `ConvGeometry`.
    precision: passed to the kernels' matmuls.
    interpret: None (interpret on CPU, compile elsewhere), a bool, or
      `pltpu.InterpretParams()` (the TPU interpreter: TPU semantics on CPU;
      'tpu' form only).
    form: 'tpu' (Mosaic: whole-dimension or dividing blocks, reductions
      over sequential grid axes), 'gpu' (Triton: power-of-two blocks over
      XLA-padded arrays, reductions in in-kernel loops), or None: 'gpu' on
      a GPU backend, else 'tpu' (also what interprets on CPU).
    block_p, block_k, block_n: tile sizes: output pixels, input channels
      (the contraction) and output channels (depthwise: channels). 'tpu'
      form: None is the DEFAULT_BLOCK_* where it divides the dimension,
      else the whole dimension; explicit sizes must divide their dimension.
      'gpu' form: powers of two (None: DEFAULT_GPU_BLOCK_*); the arrays are
      padded to whole tiles.
  Returns:
    [B, Ho, Wo, Cout], in the dtype of x and the experts combined.
  """
  check_supported(geom)
  interpret = _interpret_mode(interpret)
  if form is None:
    form = 'gpu' if jax.default_backend() == 'gpu' else 'tpu'
  if form not in ('tpu', 'gpu'):
    raise ValueError(f"form must be 'tpu', 'gpu' or None, got {form!r}.")
  out_dtype = jnp.result_type(x.dtype, experts.dtype)
  r = routing_weights.astype(F32)
  if form == 'gpu':
    return _gpu_form(x, experts, r, geom, out_dtype, precision, interpret,
                     block_p, block_k, block_n)
  batch, cin = x.shape[0], x.shape[-1]
  cout = experts.shape[-1]
  make = functools.partial(
      _Config, kernel_size=geom.kernel_size, strides=geom.strides,
      out_spatial=geom.out_spatial, phase_spatial=_phase_spatial(geom),
      out_dtype=out_dtype, precision=precision, interpret=interpret)
  xph = _phases(x, geom)
  if geom.is_depthwise:
    multiplier = cout // cin
    if multiplier > 1:  # XLA: output channel c*m + k reads input channel c
      xph = jnp.repeat(xph, multiplier, axis=-1)
    config = make(block_p=1, block_k=1,
                  block_n=_block(cout, block_n, DEFAULT_BLOCK_C, 'block_n'))
    num_experts, kh, kw = experts.shape[:3]
    return _depthwise(xph, experts.reshape(num_experts, kh, kw, cout), r,
                      config)
  if geom.is_pointwise:
    out_h, out_w = geom.out_spatial
    pixels = out_h * out_w
    config = make(block_p=_block(pixels, block_p, DEFAULT_BLOCK_P, 'block_p'),
                  block_k=_block(cin, block_k, DEFAULT_BLOCK_K, 'block_k'),
                  block_n=_block(cout, block_n, DEFAULT_BLOCK_N, 'block_n'))
    # XLA: a 1x1's padding and stride leave phase 0, the subsampled image.
    flat = xph[:, 0].reshape(batch, pixels, cin)
    y = _pointwise(flat, experts.reshape(experts.shape[0], cin, cout), r,
                   config)
    return y.reshape(batch, out_h, out_w, cout)
  config = make(block_p=1,
                block_k=_block(cin, block_k, DEFAULT_BLOCK_K, 'block_k'),
                block_n=_block(cout, block_n, DEFAULT_BLOCK_N, 'block_n'))
  return _kxk(xph, experts, r, config)


def fused_strategy(x, experts, routing_weights, geom, precision):
  """`ops`' strategy signature, with the default blocks and interpret."""
  return fused_conditional_conv(x, experts, routing_weights, geom, precision)
