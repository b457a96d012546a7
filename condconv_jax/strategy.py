"""How "auto" picks a CondConv strategy, and why.

The rule comes from `benchmarks/layer_bench.py` on two 2-core x86-64 VMs
with AVX-512, an Intel Xeon and an AMD EPYC (Zen 4) (JAX 0.10.2, float32,
E=8; the AMD table and command are in the README). Layer time over the
fastest static conv of the same shape, forward and forward+backward, on the
AMD VM:

- 1x1 convs: "direct" (the batched matmul 'bhwc,bco->bhwo') at every batch:
  1.2-2.0x for 14x14x512, 1.9-4.6x for 7x7x1024, where reading the E
  experts and writing their gradient is the floor. "vmap" (a grouped conv)
  takes up to 83x: XLA:CPU's conv backward is slower than a dot, and its
  grouped kernel gradient grows like B^2.
- depthwise convs: "direct" (k*k shifted multiply-adds, 0.8-1.7x). XLA:CPU's
  depthwise conv is 30-50x slower, and "vmap"'s backward at batch 64 asks for
  tens of GB.
- k x k convs: on CPU "loop" (one ordinary conv per example, backward as one
  im2col matmul) is 0.6-1.4x at every batch; at batch 1 "vmap" (exactly one
  ordinary conv with the mixed kernel) is within noise of it on both CPUs,
  and from batch 8 on "vmap"'s backward degrades like B^2.
- "experts" does E convolutions' worth of work (8-123x here) and never wins
  for E > 1; it is there for runtimes that accept only constant weights.

Accelerators have not been measured in this project yet. Off CPU the rule
avoids "loop" (a sequential loop over the batch wastes a parallel device) and
keeps the forms without B^2 or E-fold work.
"""

from __future__ import annotations

from condconv_jax.geometry import ConvGeometry

STRATEGIES = ('auto', 'vmap', 'experts', 'direct', 'loop')


def choose(geom: ConvGeometry, batch: int, num_experts: int,
           backend: str) -> str:
  """The strategy "auto" uses for this conv (see the module doc)."""
  del num_experts  # Measured at E=8; no E-dependent switch was found.
  if geom.is_pointwise or geom.is_depthwise:
    return 'direct'
  if backend == 'cpu':
    return 'loop'
  return 'vmap' if batch == 1 else 'direct'


def depthwise_implementation(backend: str) -> str:
  """'shifted' where XLA's depthwise conv is slow (CPU), else 'xla'."""
  return 'shifted' if backend == 'cpu' else 'xla'


def static_form(geom: ConvGeometry, backend: str) -> str:
  """How `ops.conv_general_dilated` computes a static conv on this backend.

  'matmul' (1x1, one group, no input dilation), 'shifted' (depthwise) or
  'xla' (lax.conv). Off CPU everything stays 'xla': the other forms were
  written for XLA:CPU's slow conv backward and have not been measured there.
  """
  if backend != 'cpu' or geom.input_dilation != (1, 1):
    return 'xla'
  if geom.is_pointwise and geom.feature_group_count == 1:
    return 'matmul'
  if geom.is_depthwise:
    return 'shifted'
  return 'xla'
