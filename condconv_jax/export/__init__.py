"""Models out of JAX: StableHLO, LiteRT (TFLite), ONNX and TF SavedModel.

    from condconv_jax import export
    exported = export.to_stablehlo(model, variables, (None, 224, 224, 3))
    tflite = export.to_tflite(model, variables, (1, 224, 224, 3))
    onnx = export.to_onnx(model, variables, (1, 224, 224, 3))
    export.to_savedmodel(model, variables, (1, 224, 224, 3), '/tmp/saved')

Each exports the eval-mode function `model.apply(variables, x,
train=False)`: BatchNorm in its inference form (running statistics, which
the converters fold into the constant kernels), no dropout, DyConv/ODConv at
`temperature`. Pass a trained run's EMA variables where it kept them (the
command line, `python -m condconv_jax.export`, does). `preprocess` (a
dataset's normalization, say) goes into the graph in front of the model.

input_shape is NHWC. A batch of None is symbolic in StableHLO, ONNX and
SavedModel where the chosen forms allow it; LiteRT takes a fixed batch.
Inside `to_tflite` and `to_onnx` every convolution takes the form that
runtime runs fastest (`condconv_jax.target`; the measurements: docs/export.md),
so a CondConv at batch 1 mixes its kernels and applies them once; StableHLO
and SavedModel run in XLA and keep XLA's forms. Outputs are flat: a
classifier's logits, a detector's per-anchor 'box_offsets' and
'class_logits' (`output_names`), without post-processing.

The runtimes themselves (`runtimes.py`) check an export against the Flax
model; a format a converter cannot express raises `ExportError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from condconv_jax import target

FORMATS = ('stablehlo', 'tflite', 'onnx', 'savedmodel')
BATCH_AXIS = 'batch'  # the symbolic batch's name in every format


class ExportError(RuntimeError):
  """A model that a format's converter could not express; says what to do."""


def inference_function(model, variables, *, preprocess: Callable | None = None,
                       temperature: float | None = None) -> Callable:
  """images -> the model's eval-mode outputs, as a tuple in `output_names`
  order. A new function each call, so that every export traces afresh (the
  forms depend on the target being exported for, which jit caches ignore)."""
  kwargs = {} if temperature is None else {'temperature': temperature}

  def outputs(images):
    x = images if preprocess is None else preprocess(images)
    with nn.intercept_methods(_export_forms):
      return model.apply(variables, x, train=False, **kwargs)

  def flat(images):
    out = outputs(images)
    if isinstance(out, dict):
      return tuple(out[name] for name in sorted(out))
    return (out,)

  flat.outputs = outputs
  return flat


def _export_forms(next_fun, args, kwargs, context):
  """Flax layers in the forms converters take best (see each)."""
  if context.method_name == '__call__':
    if isinstance(context.module, nn.BatchNorm):
      return _folded_batch_norm(next_fun, args, kwargs, context.module)
    if isinstance(context.module, nn.Dense) and args and args[0].ndim > 2:
      return _matrix_dense(next_fun, args, kwargs)
  return next_fun(*args, **kwargs)


def _matrix_dense(next_fun, args, kwargs):
  """nn.Dense on [..., C] as a 2-D matmul: LiteRT's converter turns a
  batch-1 4-D one into a BATCH_MATMUL it then rejects ('invalid output
  rank')."""
  x, *rest = args
  y = next_fun(x.reshape(-1, x.shape[-1]), *rest, **kwargs)
  return y.reshape(*x.shape[:-1], y.shape[-1])


def _folded_batch_norm(next_fun, args, kwargs, module):
  """BatchNorm at inference as ONE multiply-add per channel, x * m + a with
  m = scale / sqrt(var + eps), a = bias - mean * m (constants once
  exported), where flax subtracts the mean first: a pattern a converter
  can fold into the conv before it (docs/export.md)."""
  if (module.axis != -1 or module.axis_name is not None or
      kwargs.get('mask') is not None):
    return next_fun(*args, **kwargs)
  running = kwargs.get('use_running_average', args[1] if len(args) > 1
                       else None)
  if not nn.merge_param('use_running_average', module.use_running_average,
                        running):
    return next_fun(*args, **kwargs)
  x = args[0]
  mean = module.get_variable('batch_stats', 'mean')
  var = module.get_variable('batch_stats', 'var')
  mul = jax.lax.rsqrt(var + module.epsilon)
  if module.use_scale:
    mul = mul * module.get_variable('params', 'scale')
  add = -mean * mul
  if module.use_bias:
    add = add + module.get_variable('params', 'bias')
  dtype = module.dtype or jnp.result_type(x, mul)
  return (x * mul.astype(dtype) + add.astype(dtype)).astype(dtype)


def output_names(model, variables, input_shape, **kwargs) -> list[str]:
  """The exported outputs' names: ['logits'] for a classifier, the sorted
  keys of a detector's output dict."""
  fn = inference_function(model, variables, **kwargs)
  out = jax.eval_shape(fn.outputs, _spec(_fixed(input_shape)))
  return sorted(out) if isinstance(out, dict) else ['logits']


def to_stablehlo(model, variables, input_shape: Sequence[int | None], *,
                 platforms: Sequence[str] | None = None,
                 **kwargs) -> jax.export.Exported:
  """A `jax.export.Exported` (serialize() for the bytes), for `platforms`
  (default: this backend), with a symbolic batch when input_shape[0] is
  None. kwargs: `inference_function`'s."""
  fn = jax.jit(inference_function(model, variables, **kwargs))
  spec = _spec(input_shape, symbolic=input_shape[0] is None)
  with _converting('StableHLO', input_shape):
    return jax.export.export(fn, platforms=platforms)(spec)


def to_tflite(model, variables, input_shape: Sequence[int], *,
              quantize: str | None = None, **kwargs) -> bytes:
  """A LiteRT flatbuffer (fixed batch), built with TF's TFLite converter
  from the jax2tf (StableHLO) function, TFLite builtin ops only.
  quantize='dynamic_range' stores the weights in int8 (LiteRT's dynamic
  range quantization); None keeps float32."""
  if input_shape[0] is None:
    raise ValueError('LiteRT takes a fixed batch: pass input_shape with a '
                     'batch size, e.g. (1, 224, 224, 3).')
  if quantize not in (None, 'dynamic_range'):
    raise ValueError(f"quantize must be None or 'dynamic_range', got "
                     f'{quantize!r}.')
  tf = _import_tf()
  with target.exporting_for('litert'), _converting('LiteRT', input_shape):
    function = _tf_function(model, variables, input_shape, **kwargs)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [function.get_concrete_function()], function)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize == 'dynamic_range':
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


def to_onnx(model, variables, input_shape: Sequence[int | None],
            **kwargs) -> bytes:
  """An ONNX model (jax2onnx), input 'images' [B, H, W, C], symbolic batch
  when input_shape[0] is None."""
  # jax2onnx logs a traceback for each optional plugin whose library
  # (equinox, dm-pix) is absent or older; none of them is used here.
  logging.getLogger('jax2onnx').setLevel(logging.ERROR)
  import jax2onnx  # pylint: disable=import-outside-toplevel
  names = output_names(model, variables, input_shape, **kwargs)
  fn = inference_function(model, variables, **kwargs)
  with target.exporting_for('onnx'), _converting('ONNX', input_shape):
    # jax2onnx converts the primitives of a traced jaxpr: tracing first
    # keeps out its stand-ins for Flax layers (its nn.BatchNorm lays out a
    # residual add wrongly, and ONNX Runtime rejects ResNets). The same
    # spec, symbolic batch included, goes to both.
    spec = _spec(input_shape, symbolic=input_shape[0] is None)
    traced = jax.make_jaxpr(fn)(spec)
    proto = jax2onnx.to_onnx(jax.extend.core.jaxpr_as_fun(traced), [spec],
                             input_names=['images'], output_names=names)
  return proto.SerializeToString()


def to_savedmodel(model, variables, input_shape: Sequence[int | None],
                  path: str | os.PathLike, **kwargs) -> None:
  """A TF SavedModel at `path` (a new folder; written whole or not at all)
  whose 'serving_default' signature maps 'images' to the outputs. It runs
  the StableHLO in TF (jax2tf native serialization)."""
  tf = _import_tf()
  names = output_names(model, variables, input_shape, **kwargs)
  with _converting('SavedModel', input_shape):
    function = _tf_function(model, variables, input_shape, **kwargs)
    module = tf.Module()
    module.serve = tf.function(
        lambda images: dict(zip(names, function(images))), autograph=False,
        input_signature=[_tf_spec(tf, input_shape)])
    with atomic_path(path) as partial:
      tf.saved_model.save(module, partial,
                          signatures={'serving_default': module.serve})


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
  """Yields a scratch path beside `path`, moved onto `path` only when the
  block completes: a failed export leaves nothing at `path`. Refuses an
  existing folder rather than merge into it."""
  path = os.fspath(path)
  if os.path.isdir(path):
    raise FileExistsError(f'{path} is an existing folder; pass a new path or '
                          f'remove it first.')
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  scratch = tempfile.mkdtemp(prefix='.export-', dir=parent)
  partial = os.path.join(scratch, os.path.basename(path))
  try:
    yield partial
    os.replace(partial, path)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def _fixed(input_shape):
  return (1, *input_shape[1:]) if input_shape[0] is None else tuple(
      input_shape)


def _spec(input_shape, symbolic: bool = False):
  if symbolic:
    shape = jax.export.symbolic_shape(
        ', '.join([BATCH_AXIS, *map(str, input_shape[1:])]))
  else:
    shape = tuple(input_shape)
  return jax.ShapeDtypeStruct(shape, np.float32)


def _tf_spec(tf, input_shape):
  return tf.TensorSpec(tuple(input_shape), tf.float32, name='images')


def _tf_function(model, variables, input_shape, **kwargs):
  """The model as a tf.function (jax2tf: StableHLO inside XlaCallModule)."""
  from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel
  tf = _import_tf()
  fn = inference_function(model, variables, **kwargs)
  polymorphic = None
  if input_shape[0] is None:
    polymorphic = [f'({BATCH_AXIS}, ' + ', '.join(map(str, input_shape[1:])) +
                   ')']
  converted = jax2tf.convert(fn, polymorphic_shapes=polymorphic,
                             with_gradient=False)
  return tf.function(converted, autograph=False,
                     input_signature=[_tf_spec(tf, input_shape)])


def _import_tf():
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TF's start-up chatter
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf


@contextlib.contextmanager
def _converting(format_name: str, input_shape):
  """Turns a converter's failure into an ExportError that says what failed
  and what to try."""
  if len(input_shape) != 4:
    raise ValueError(f'input_shape must be NHWC (4 numbers), got '
                     f'{tuple(input_shape)}.')
  try:
    yield
  except (ValueError, FileExistsError):
    raise
  except Exception as error:  # converters raise many types
    first = (str(error).strip().splitlines() or [''])[0][:400]
    hint = (' A symbolic batch needs forms whose shapes do not depend on it: '
            'pass a fixed batch (e.g. 1).' if input_shape[0] is None else
            " If the model names a CondConv strategy, leave it 'auto' (the "
            'forms this runtime takes, docs/export.md).')
    raise ExportError(f'{format_name} export failed: {type(error).__name__}: '
                      f'{first}.{hint}') from error
