"""Convolution geometry: argument normalization, padding and output shapes.

Every CondConv strategy computes the same convolution, so they all take their
padding and output size from one place. Padding strings are resolved to explicit
(low, high) pairs exactly the way `lax.conv_general_dilated` resolves them
('SAME' is TensorFlow's SAME: the odd extra pixel goes to the high side).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Union

from jax import lax

PaddingLike = Union[str, int, Sequence[Union[int, tuple[int, int]]]]


def normalize_pair(value, name: str) -> tuple[int, int]:
  """An int or a length-2 sequence of positive ints -> (int, int)."""
  if value is None:
    value = 1
  if isinstance(value, int):
    value = (value, value)
  value = tuple(value)
  if len(value) != 2 or not all(isinstance(v, int) and v >= 1 for v in value):
    raise ValueError(
        f'{name} must be a positive int or a pair of positive ints for a 2D '
        f'convolution, got {value!r}.')
  return value


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
  """A 2D NHWC convolution's static shape facts, with padding made explicit."""

  kernel_size: tuple[int, int]
  strides: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  input_dilation: tuple[int, int]
  kernel_dilation: tuple[int, int]
  feature_group_count: int
  in_features: int
  out_features: int
  in_spatial: tuple[int, int]

  @property
  def out_spatial(self) -> tuple[int, int]:
    out = []
    for n, k, s, (lo, hi), di, dk in zip(self.in_spatial, self.kernel_size,
                                         self.strides, self.padding,
                                         self.input_dilation,
                                         self.kernel_dilation):
      span = (n - 1) * di + 1 + lo + hi
      window = (k - 1) * dk + 1
      out.append(max(0, (span - window) // s + 1))
    return tuple(out)

  @property
  def is_pointwise(self) -> bool:
    return self.kernel_size == (1, 1)

  @property
  def is_depthwise(self) -> bool:
    """One input channel per group (any channel multiplier)."""
    return (self.feature_group_count == self.in_features and
            self.feature_group_count > 1)

  @property
  def kernel_shape(self) -> tuple[int, int, int, int]:
    """The static (per expert) HWIO kernel shape."""
    return (*self.kernel_size, self.in_features // self.feature_group_count,
            self.out_features)

  @property
  def kernel_elements(self) -> int:
    kh, kw, cin, cout = self.kernel_shape
    return kh * kw * cin * cout


def resolve_padding(padding: PaddingLike, in_spatial, kernel_size, strides,
                    input_dilation, kernel_dilation):
  """Padding as nn.Conv accepts it -> ((lo, hi), (lo, hi))."""
  if isinstance(padding, str):
    if padding.upper() not in ('SAME', 'VALID'):
      raise ValueError(
          f"padding must be 'SAME', 'VALID', an int or a sequence of ints or "
          f"(low, high) pairs, got {padding!r}.")
    dilated_in = [(n - 1) * d + 1 for n, d in zip(in_spatial, input_dilation)]
    window = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
    pads = lax.padtype_to_pads(dilated_in, window, strides, padding.upper())
    return tuple((int(lo), int(hi)) for lo, hi in pads)
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  pads = []
  for p in padding:
    if isinstance(p, int):
      pads.append((p, p))
    elif len(tuple(p)) == 2 and all(isinstance(v, int) for v in p):
      pads.append(tuple(p))
    else:
      raise ValueError(f'padding entries must be ints or (low, high) pairs of '
                       f'ints, got {p!r} in {padding!r}.')
  if len(pads) != 2:
    raise ValueError(f'padding must give 2 spatial dimensions for a 2D '
                     f'convolution, got {padding!r}.')
  return tuple(pads)


def conv_geometry(x_shape, kernel_shape, *, strides=1, padding: PaddingLike =
                  'SAME', input_dilation=1, kernel_dilation=1,
                  feature_group_count: int = 1) -> ConvGeometry:
  """Validates an NHWC input shape against an HWIO kernel shape.

  Args:
    x_shape: [B, H, W, Cin].
    kernel_shape: [kh, kw, Cin / feature_group_count, Cout].
  """
  if len(x_shape) != 4:
    raise ValueError(f'x must be NHWC with rank 4 [batch, height, width, '
                     f'channels], got shape {tuple(x_shape)}.')
  if len(kernel_shape) != 4:
    raise ValueError(f'kernel must be HWIO with rank 4, got shape '
                     f'{tuple(kernel_shape)}.')
  g = feature_group_count
  if not isinstance(g, int) or g < 1:
    raise ValueError(f'feature_group_count must be a positive int, got {g!r}.')
  cin = x_shape[-1]
  kh, kw, cin_g, cout = kernel_shape
  if cin % g:
    raise ValueError(f'input channels ({cin}) must be divisible by '
                     f'feature_group_count ({g}).')
  if cout % g:
    raise ValueError(f'output features ({cout}) must be divisible by '
                     f'feature_group_count ({g}).')
  if cin_g * g != cin:
    raise ValueError(f'kernel input channels ({cin_g}) times '
                     f'feature_group_count ({g}) must equal the input channels '
                     f'({cin}).')
  kernel_size = (kh, kw)
  strides = normalize_pair(strides, 'strides')
  input_dilation = normalize_pair(input_dilation, 'input_dilation')
  kernel_dilation = normalize_pair(kernel_dilation, 'kernel_dilation')
  in_spatial = tuple(x_shape[1:3])
  pads = resolve_padding(padding, in_spatial, kernel_size, strides,
                         input_dilation, kernel_dilation)
  return ConvGeometry(kernel_size, strides, pads, input_dilation,
                      kernel_dilation, g, cin, cout, in_spatial)
