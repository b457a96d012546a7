"""How "auto" picks a CondConv strategy, and why.

The rule comes from `benchmarks/layer_bench.py` on a 2-core x86-64 CPU (JAX
0.10.2, float32, E=8; table and command in the README). Layer time over the
fastest static conv of the same shape, forward and forward+backward:

- 1x1 convs: "direct" (the batched matmul 'bhwc,bco->bhwo') at every batch:
  1.35-2.6x for 14x14x512, 2.4-8.8x for 7x7x1024, where reading the E
  experts and writing their gradient is the floor. "vmap" (a grouped conv)
  takes 2.4-84x: XLA:CPU's conv backward is slower than a dot, and its
  grouped kernel gradient grows like B^2.
- depthwise convs: "direct" (k*k shifted multiply-adds, 1.1-1.4x). XLA:CPU's
  depthwise conv is 26-40x slower, and "vmap"'s backward at batch 64 asks for
  tens of GB.
- k x k convs: at batch 1 "vmap" is exactly one ordinary conv with the mixed
  kernel (1.2-1.4x). From batch 2 on, on CPU, "loop" (one ordinary conv per
  example, backward in the tap-matmul form) is 0.8-1.45x; "direct" matches
  it in the backward but is up to 2x in the forward, and "vmap"'s backward
  degrades like B^2.
- "experts" does E convolutions' worth of work (8.5-50x here) and never wins
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
  if batch == 1:
    return 'vmap'
  return 'loop' if backend == 'cpu' else 'direct'


def depthwise_implementation(backend: str) -> str:
  """'shifted' where XLA's depthwise conv is slow (CPU), else 'xla'."""
  return 'shifted' if backend == 'cpu' else 'xla'
