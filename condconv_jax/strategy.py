"""How "auto" picks a CondConv strategy, and why.

The rule comes from `benchmarks/layer_bench.py` on three CPUs and one GPU
(E=8; tables and commands in the README): 2-core x86-64 VMs with AVX-512,
an Intel Xeon (the first table, earlier code) and an AMD EPYC (Zen 4, JAX
0.10.2, tcmalloc), two cores of an Intel Xeon host (family 6 model 207,
JAX 0.11.2, glibc malloc) with the current code, and an NVIDIA H200
(bfloat16). Layer time over the fastest static conv of the same shape,
forward and forward+backward:

- 1x1 convs: "direct" (the batched matmul 'bhwc,bco->bhwo') at every batch
  on both current-code CPUs (AMD 1.2-4.6x, Intel host 1.0-16x, worst at
  7x7x1024 batch 1, where reading the E experts and writing their gradient
  is the floor) and on the GPU (0.8-8x against a static conv that takes
  0.04-0.1 ms there). "vmap" (a grouped conv) takes up to 96x on CPU (its
  grouped kernel gradient grows like B^2) and 123x on the GPU.
- 1x1 convs on a 1x1 input (a classifier): "experts" (one matmul of the
  routing-scaled inputs with the stacked experts, `ops._pointwise_experts`)
  does the E*Cin*Cout MACs the kernel mixing alone would, without per-example
  kernels or their gradients: 1.9-2.8x faster than "direct" on the AMD VM
  from batch 16 (1.1-1.4x at batch 1), and the argument (same MACs, less
  memory) holds on any backend.
- depthwise convs: "direct" (k*k shifted multiply-adds): 0.8-1.7x on the
  CPUs, 0.9-1.5x on the GPU. XLA:CPU's depthwise conv is 30-50x slower, and
  "vmap"'s backward at batch 64 asks for tens of GB on CPU.
- k x k convs: on CPU "loop" (one ordinary conv per example, backward as one
  im2col matmul) is 0.6-1.4x at every batch on both CPUs; at batch 1 "vmap"
  (exactly one ordinary conv with the mixed kernel) is within noise of it
  on every CPU measured, and from batch 8 on "vmap"'s backward degrades like
  B^2. Off CPU "loop" would serialize a parallel device; "direct" (im2col
  matmul) trains CC-ResNet-50 on the H200 3.7x faster than "vmap" (bfloat16,
  batch 128: 30 vs 111 ms per step; `benchmarks/model_bench.py
  --cc-strategies auto vmap`). Batch-1 k x k on a GPU is not measured: the
  rule keeps "vmap" there (one conv, no im2col buffer).
- "experts" in general does E convolutions' worth of work (7-123x here) and
  never wins for E > 1 except on the 1x1 input above; it is there for
  runtimes that accept only constant weights.
"""

from __future__ import annotations

from condconv_jax.geometry import ConvGeometry

STRATEGIES = ('auto', 'vmap', 'experts', 'direct', 'loop')


def choose(geom: ConvGeometry, batch: int, num_experts: int,
           backend: str) -> str:
  """The strategy "auto" uses for this conv (see the module doc)."""
  del num_experts  # Measured at E=8; no E-dependent switch was found.
  if (geom.is_pointwise and geom.feature_group_count == 1 and
      geom.out_spatial == (1, 1)):
    return 'experts'  # a classifier: E*Cin*Cout MACs either way, see above
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
  written for XLA:CPU's slow conv backward. On the H200 the layer bench's
  static layers take 0.04-0.1 ms, launch-bound, with the matmul form at
  0.5-1.0x lax.conv's time and the shifted depthwise at 0.6-1.0x: too close
  to the launch floor to switch without a whole-model measurement.
  """
  if backend != 'cpu' or geom.input_dilation != (1, 1):
    return 'xla'
  if geom.is_pointwise and geom.feature_group_count == 1:
    return 'matmul'
  if geom.is_depthwise:
    return 'shifted'
  return 'xla'
