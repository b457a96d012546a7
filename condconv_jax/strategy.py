"""How "auto" picks a CondConv strategy, and per-conv-kind strategy specs.

The rule, per conv kind (`conv_kind`), measured with
`benchmarks/layer_bench.py` and `benchmarks/model_bench.py` on CPUs and an
NVIDIA H200 (figures and commands: docs/speed.md, "The rules"):

- classifier (ungrouped 1x1 on a 1x1 input): "experts", one matmul of the
  routing-scaled inputs with the stacked experts: the MACs of the kernel
  mixing alone, with no per-example kernels or their gradients;
- any other 1x1, and depthwise: "direct" (a batched matmul; k*k shifted
  multiply-adds), best or tied on every machine measured; "vmap"'s grouped
  backward grows like B^2;
- k x k on CPU: "loop" (one ordinary conv per example, backward as one
  im2col matmul); "vmap" ties it only at batch 1;
- k x k off CPU: "direct" (an im2col batched matmul), since a loop would
  serialize a parallel device; "vmap" (exactly one conv) at batch 1, which
  is not measured there.

Exported models (`target.exporting_for`: LiteRT, ONNX Runtime) run in
runtimes whose fast kernels want constant weights, so a per-example kernel
leaves them either way; measured on whole models at batch 1 on CPU
(docs/export.md, "Forms per runtime"): 1x1 "direct" (a batched matmul) in
both, the classifier included (LiteRT's converter cannot take "experts" at
batch 1); depthwise "vmap" (one depthwise conv of the mixed kernels;
"experts" for a symbolic batch); k x k "direct" (an im2col batched matmul).

ODConv with one kernel (a spatial attention, no kernel mixing) on an
ungrouped k x k conv: 'scaled_patches' (`resolve(..., spatial_only=True)`),
the im2col patches scaled per tap and one matmul with the static kernel,
no per-example kernels; well ahead of "direct" and "loop" in training
(docs/speed.md, "DyConv and ODConv").

"experts" in general does E convolutions' worth of work; it is there for
runtimes that accept only constant weights. A spec such as 'depthwise=vmap'
overrides the rule per conv kind (`parse`).

"fused" (`condconv_jax.fused`: Pallas kernels that mix the experts on-chip,
no per-example kernels in HBM) is never picked by "auto": it has not been
measured on any accelerator, and on CPU it runs in Pallas' interpreter.
"auto" will pick it only where a measurement shows it ahead. Choose it
explicitly: strategy='fused', or per conv kind, e.g. 'depthwise=fused'.
"""

from __future__ import annotations

from condconv_jax.geometry import ConvGeometry
from condconv_jax.target import EXPORT_RUNTIMES

STRATEGIES = ('auto', 'vmap', 'experts', 'direct', 'loop', 'fused')
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
            backend: str, spatial_only: bool = False) -> str:
  """The strategy a spec (see `parse`) runs this conv with.

  spatial_only: the conv is ODConv's with one kernel and a spatial
  attention (its taps scaled per example); "auto" then runs an ungrouped
  k x k one as 'scaled_patches' (`ops.spatially_scaled_conv`): the static
  conv's MACs and kernel-gradient size, where every per-example form
  writes per-example kernels and their gradients (docs/speed.md).
  """
  default, overrides = parse(spec)
  name = overrides.get(conv_kind(geom), default)
  if name != 'auto':
    return name
  if spatial_only and conv_kind(geom) == 'kxk':
    return 'scaled_patches'
  return choose(geom, batch, num_experts, backend)


def choose(geom: ConvGeometry, batch: int, num_experts: int,
           backend: str) -> str:
  """The strategy "auto" uses for this conv (see the module doc)."""
  del num_experts  # Measured at E=8; no E-dependent switch was found.
  kind = conv_kind(geom)
  if backend in EXPORT_RUNTIMES:
    if kind == 'depthwise':
      # "vmap" has batch * channels groups, and jax2onnx cannot pad (the
      # shifted form) with a symbolic batch: then the experts' grouped conv.
      return 'vmap' if isinstance(batch, int) else 'experts'
    return 'direct'
  if kind == 'classifier':
    return 'experts'  # E*Cin*Cout MACs either way, see above
  if kind == 'depthwise' or geom.is_pointwise:  # any other 1x1, grouped too
    return 'direct'
  if backend == 'cpu':
    return 'loop'
  return 'vmap' if batch == 1 else 'direct'
