"""Exports a trained run, checks it in its runtime, writes it.

  python -m condconv_jax.export --workdir /tmp/fashion --format tflite \\
      --out /tmp/fashion.tflite [--checkpoint STEP] [--batch_size 1]

--format: tflite (LiteRT), onnx, stablehlo (`jax.export` serialized bytes)
or savedmodel (a folder). The exported graph takes float32 images [B, H, W,
C] with pixel values in [0, 255], as the run's input pipeline gives them
(its normalization is inside), and returns the eval-mode outputs of the
run's EMA weights when it kept them (else its weights). A detector's
outputs are per anchor, without post-processing (docs/export.md lists them
and how to decode them); --postprocess accepts only 'none'.

Before anything reaches --out, the export runs in its runtime on a batch of
random images and its outputs are compared with the Flax model's; it is
written only when they agree to --tolerance (relative). A failed export or
check leaves nothing at --out.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from absl import app, flags, logging

from condconv_jax import config_schema, cpu_setup, export
from condconv_jax.export import runtimes
from condconv_jax.training import checkpoint, tasks, trainer

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training workdir holding checkpoints/.')
flags.DEFINE_integer('checkpoint', None, 'Checkpoint step (default: latest).')
flags.DEFINE_enum('format', None, list(export.FORMATS), 'Export format.')
flags.DEFINE_string('out', None, 'Output file (a folder for savedmodel).')
flags.DEFINE_integer('batch_size', 1, 'Batch size of the exported graph.')
flags.DEFINE_bool('dynamic_batch', False,
                  'A symbolic batch (stablehlo, onnx, savedmodel).')
flags.DEFINE_enum('quantize', 'none', ['none', 'dynamic_range'],
                  'tflite: int8 weights (LiteRT dynamic range quantization).')
flags.DEFINE_string('postprocess', 'none',
                    'Detectors: only "none" (raw per-anchor outputs).')
flags.DEFINE_float('tolerance', 1e-4,
                   'Largest relative difference from Flax the check accepts '
                   '(dynamic_range quantization: pass a looser one).')
flags.mark_flags_as_required(['workdir', 'format', 'out'])

CHECK_BATCH = 2  # examples the check runs when the batch is symbolic


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cpu_setup.use_tcmalloc()
  logging.set_verbosity(logging.WARNING)
  options = _checked_options()
  config = config_schema.load_config(FLAGS.workdir)
  try:
    run, variables = trainer.restore_for_eval(config, FLAGS.workdir,
                                              FLAGS.checkpoint)
  except checkpoint.CheckpointError as error:
    checkpoint.exit_with(error, 'python -m condconv_jax.export')
  detector = isinstance(run.task, tasks.Detection)
  if detector and FLAGS.postprocess != 'none':
    raise app.UsageError(
        f'--postprocess {FLAGS.postprocess!r} is not supported: the export '
        f'carries the detector\'s raw per-anchor outputs (box_offsets, '
        f'class_logits); decode and suppress them as docs/export.md shows, '
        f'and pass --postprocess none.')
  variables = jax.device_get(variables)
  kwargs = dict(preprocess=run.normalize, temperature=run.eval_temperature)
  batch = None if FLAGS.dynamic_batch else FLAGS.batch_size
  input_shape = (batch, *run.dataset.image_shape)
  images = np.random.default_rng(0).uniform(
      0, 255, (batch or CHECK_BATCH, *input_shape[1:])).astype(np.float32)
  function = export.inference_function(run.model, variables, **kwargs)
  expected = [np.asarray(o) for o in jax.jit(function)(images)]
  names = export.output_names(run.model, variables, input_shape, **kwargs)

  try:
    with export.atomic_path(FLAGS.out) as partial:
      artifact = _export(run.model, variables, input_shape, partial,
                         options, kwargs)
      error = runtimes.relative_error(
          runtimes.run(FLAGS.format, artifact, images), expected)
      if not error <= FLAGS.tolerance:
        raise export.ExportError(
            f'the {FLAGS.format} export differs from the Flax model by '
            f'{error:.2e} (relative; --tolerance {FLAGS.tolerance:g}). '
            f'Nothing was written to {FLAGS.out}.')
  except (export.ExportError, FileExistsError, ValueError) as failure:
    sys.exit(f'python -m condconv_jax.export: {failure}')
  size = _size(FLAGS.out)
  print(f'{FLAGS.format} -> {FLAGS.out} ({size / 1e6:.2f} MB)')
  print(f'input: images float32 {_shape_text(input_shape)} (pixel values '
        f'0-255; the run\'s normalization is inside)')
  print(f'outputs: {", ".join(names)}' +
        (' (per anchor, no post-processing: docs/export.md)' if detector
         else ''))
  print(f'check: {_RUNTIME_NAMES[FLAGS.format]} on {len(images)} random '
        f'images vs the Flax eval outputs: max relative difference '
        f'{error:.2e} (tolerance {FLAGS.tolerance:g})')


_RUNTIME_NAMES = {
    'tflite': 'LiteRT interpreter (ai_edge_litert)',
    'onnx': 'ONNX Runtime (CPUExecutionProvider)',
    'stablehlo': 'jax.export.deserialize(...).call',
    'savedmodel': 'tf.saved_model.load(...) serving_default',
}


def _checked_options() -> dict:
  if FLAGS.batch_size < 1:
    raise app.UsageError(f'--batch_size must be >= 1, got '
                         f'{FLAGS.batch_size}; --dynamic_batch makes it '
                         f'symbolic.')
  if FLAGS.dynamic_batch and FLAGS.format == 'tflite':
    raise app.UsageError('LiteRT takes a fixed batch: drop --dynamic_batch '
                         'and set --batch_size.')
  if FLAGS.quantize != 'none' and FLAGS.format != 'tflite':
    raise app.UsageError('--quantize applies to --format tflite only.')
  if '://' in FLAGS.out:
    raise app.UsageError(f'--out must be a local path, got {FLAGS.out}; '
                         f'copy the file to remote storage afterwards.')
  quantize = None if FLAGS.quantize == 'none' else FLAGS.quantize
  return {'quantize': quantize} if FLAGS.format == 'tflite' else {}


def _export(model, variables, input_shape, path, options, kwargs):
  """Writes the export at `path`; returns what its runtime loads (the
  bytes, or the SavedModel's folder)."""
  if FLAGS.format == 'savedmodel':
    # to_savedmodel writes atomically itself; here into the scratch folder.
    export.to_savedmodel(model, variables, input_shape, path, **kwargs)
    return path
  if FLAGS.format == 'stablehlo':
    blob = bytes(export.to_stablehlo(model, variables, input_shape,
                                     **kwargs).serialize())
  elif FLAGS.format == 'tflite':
    blob = export.to_tflite(model, variables, input_shape, **options,
                            **kwargs)
  else:
    blob = export.to_onnx(model, variables, input_shape, **kwargs)
  with open(path, 'wb') as f:
    f.write(blob)
  return blob


def _size(path) -> int:
  if os.path.isdir(path):
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, files in os.walk(path) for name in files)
  return os.path.getsize(path)


def _shape_text(shape) -> str:
  return '[' + ', '.join('B' if d is None else str(d) for d in shape) + ']'


if __name__ == '__main__':
  app.run(main)
