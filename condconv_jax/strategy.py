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

Whole models on the H200 (`benchmarks/profile_step.py`, README) found what
the layer table cannot: XLA:GPU fuses the "direct" depthwise form's shifted
multiply-adds into the reduction that follows (squeeze-excite pooling,
batch-norm gradients) and runs that fusion 4-10x slower than cuDNN's
depthwise conv plus the reduction, most of CC-EfficientNet-B0's GPU gap.
Candidates: "depthwise=vmap" (cuDNN grouped convs, which nothing can fuse
into) and the shifted form kept apart from its neighbours by optimization
barriers (benchmarks/depthwise_variants.py); the rule changes when a GPU run
measures them (`PARTS=b0_depthwise benchmarks/gpu_bench.sh`). A spec such
as 'depthwise=vmap' overrides the rule per conv kind (`parse`).
"""

from __future__ import annotations

from condconv_jax.geometry import ConvGeometry

STRATEGIES = ('auto', 'vmap', 'experts', 'direct', 'loop')
# What `conv_kind` calls a conv; a strategy spec can name one per kind.
CONV_KINDS = ('classifier', 'pointwise', 'depthwise', 'grouped', 'kxk')


def conv_kind(geom: ConvGeometry) -> str:
  """'classifier' (ungrouped 1x1 with a 1x1 output), 'pointwise' (other
  ungrouped 1x1), 'depthwise', 'grouped' (other grouped convs) or 'kxk'."""
  if geom.is_depthwise:
    return 'depthwise'
  if geom.feature_group_count > 1:
    return 'grouped'
  if geom.is_pointwise:
    return 'classifier' if geom.out_spatial == (1, 1) else 'pointwise'
  return 'kxk'


def parse(spec: str) -> tuple[str, dict[str, str]]:
  """A strategy spec -> (default strategy, {conv kind: strategy}).

  A spec is one of `STRATEGIES` ('auto', 'direct', ...) for every conv, or
  comma-separated overrides per conv kind with an optional default first:
  'depthwise=vmap' (auto for the other kinds), 'direct,kxk=loop'. A string,
  so that a config file or a command line can carry it. Raises ValueError
  naming what is wrong.
  """
  hint = (f' A strategy can also be named per conv kind ({", ".join(CONV_KINDS)}'
          "), e.g. 'depthwise=vmap' or 'direct,kxk=loop'.")
  if not isinstance(spec, str):
    raise ValueError(f'strategy must be a string; got {spec!r}.{hint}')
  default, overrides = 'auto', {}
  for position, item in enumerate(part.strip() for part in spec.split(',')):
    if not item:
      raise ValueError(f'strategy {spec!r} has an empty item: separate items '
                       f'with single commas.{hint}')
    kind, equals, name = (part.strip() for part in item.partition('='))
    if not equals:
      kind, name = None, kind
    if name not in STRATEGIES:
      where = '' if name == spec else f' in {spec!r}'
      raise ValueError(f'strategy must be one of '
                       f'{", ".join(repr(s) for s in STRATEGIES)}; got '
                       f'{name!r}{where}.{hint}')
    if kind is None:
      if position:
        raise ValueError(f'strategy {spec!r}: the default ({name!r}) must '
                         "come first, e.g. 'direct,kxk=loop'.")
      default = name
    elif kind not in CONV_KINDS:
      raise ValueError(f'strategy {spec!r}: unknown conv kind {kind!r}; the '
                       f'kinds are {", ".join(CONV_KINDS)}.')
    elif kind in overrides:
      raise ValueError(f'strategy {spec!r} names {kind!r} twice.')
    else:
      overrides[kind] = name
  return default, overrides


def resolve(spec: str, geom: ConvGeometry, batch: int, num_experts: int,
            backend: str) -> str:
  """The strategy a spec (see `parse`) runs this conv with."""
  default, overrides = parse(spec)
  name = overrides.get(conv_kind(geom), default)
  return choose(geom, batch, num_experts, backend) if name == 'auto' else name


def choose(geom: ConvGeometry, batch: int, num_experts: int,
           backend: str) -> str:
  """The strategy "auto" uses for this conv (see the module doc)."""
  del num_experts  # Measured at E=8; no E-dependent switch was found.
  kind = conv_kind(geom)
  if kind == 'classifier':
    return 'experts'  # E*Cin*Cout MACs either way, see above
  if kind == 'depthwise' or geom.is_pointwise:  # any other 1x1, grouped too
    return 'direct'
  if backend == 'cpu':
    return 'loop'
  return 'vmap' if batch == 1 else 'direct'


def depthwise_implementation(backend: str) -> str:
  """'shifted' where XLA's depthwise conv is slow (CPU), else 'xla'."""
  return 'shifted' if backend == 'cpu' else 'xla'


# B*Ho*Wo from which a k x k conv's kernel gradient is an im2col matmul on
# CPU (`static_form`).
IM2COL_GRAD_MIN_OUTPUTS = 4096


def static_form(geom: ConvGeometry, backend: str, batch: int) -> str:
  """How `ops.conv_general_dilated` computes a static conv on this backend.

  'matmul' (1x1, one group, no input dilation), 'shifted' (depthwise),
  'im2col_grad' (k x k, one group, at least IM2COL_GRAD_MIN_OUTPUTS output
  pixels in the batch: XLA's conv with its kernel gradient as one im2col
  matmul) or 'xla' (lax.conv). XLA:CPU's kernel gradient runs the B*Ho*Wo
  reduction as a conv window. `benchmarks/kernel_grad_bench.py` on two
  cores of the Intel Xeon (family 6 model 207, JAX 0.10.2) timed the matmul
  at 0.59-0.69x XLA's time from 12544 outputs up for ResNet-50's 56x56 and
  28x28 3x3 layers, its 7x7 stride-2 stem and the MobileNet stem at batch
  16 (0.36-0.42x for 256-channel layers there), 0.89x at 5776 (19x19x256,
  batch 16) and 0.97-1.69x at 784-3136 outputs (14x14 and 7x7 layers at
  batch 16, batch 1 at 28x28 and 56x56); the threshold sits between those
  (not measured on the AMD EPYC VM). Off CPU everything stays 'xla': the
  other forms were written for XLA:CPU's slow conv backward. On the H200 the layer bench's static
  layers take 0.04-0.1 ms, launch-bound, with the matmul form at 0.5-1.0x
  lax.conv's time and the shifted depthwise at 0.6-1.0x: too close to the
  launch floor to switch without a whole-model measurement.
  """
  if backend != 'cpu' or geom.input_dilation != (1, 1):
    return 'xla'
  if geom.is_pointwise and geom.feature_group_count == 1:
    return 'matmul'
  if geom.is_depthwise:
    return 'shifted'
  out_h, out_w = geom.out_spatial
  if (geom.feature_group_count == 1 and
      batch * out_h * out_w >= IM2COL_GRAD_MIN_OUTPUTS):
    return 'im2col_grad'
  return 'xla'
