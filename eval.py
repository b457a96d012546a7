"""Evaluates a checkpoint on every example of the evaluation split.

  python eval.py --workdir /tmp/fashion/experts_8 [--step N]
  python eval.py --checkpoint /tmp/cc_b0_4e --data_dir=$TFDS_DATA_DIR
  ... [--routing_png routing.png] [--config configs/... --config.field=...]

--workdir is a training workdir (its latest checkpoint, or --step; the EMA
weights when the run kept them); --checkpoint a folder of converted weights
(`python -m condconv_jax.convert`). Both may be gs:// URIs. The config is the
one saved beside the checkpoint unless --config is given (then
--config.field=value overrides it); --data_dir and --batch_size override the
saved config. With --routing_png it also writes the paper's routing
analysis: the mean routing weight per class for every CondConv layer
(detectors: over all images); with --detections_png, detectors draw their
boxes on the first --num_images images of the evaluation split (--split).
Multi-host: the same flags as train.py (--distributed, or
--coordinator_address/--num_processes/--process_id).
"""

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from condconv_jax import config_schema, convert, cpu_setup
from condconv_jax.training import (checkpoint, detection_figure, distributed,
                                   routing_analysis, tasks, trainer)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file (default: the saved config.json).',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Training workdir holding checkpoints/.')
flags.DEFINE_string('checkpoint', None, 'Folder of converted weights.')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
flags.DEFINE_string('routing_png', None, 'Write the routing analysis here.')
flags.DEFINE_string('detections_png', None,
                    'Detectors: write evaluation images with ground-truth '
                    'and detected boxes here.')
flags.DEFINE_integer('num_images', 4, 'Images in --detections_png.')
flags.DEFINE_float('min_score', 0.3, 'Detections drawn: score at least.')
flags.DEFINE_string('split', None, 'Overrides config.eval_split.')
flags.DEFINE_string('data_dir', None, 'Overrides config.data_dir.')
flags.DEFINE_integer('batch_size', None, 'Overrides config.batch_size.')
flags.mark_flags_as_mutual_exclusive(['workdir', 'checkpoint'], required=True)


def restore(config):
  """(trainer, variables), replicated over the mesh of every process."""
  if FLAGS.workdir:
    return trainer.restore_for_eval(config, FLAGS.workdir, FLAGS.step)
  run = trainer.Trainer(config)
  target = run.replicated_like(run.abstract_variables())
  return run, convert.load_variables(FLAGS.checkpoint, target)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # XLA's per-step temporaries page-fault under glibc's malloc; re-executes
  # once with tcmalloc preloaded when installed (condconv_jax/cpu_setup.py).
  cpu_setup.use_tcmalloc()
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  distributed.initialize()
  source = FLAGS.workdir or FLAGS.checkpoint
  config = FLAGS.config or config_schema.load_config(source)
  if FLAGS.data_dir is not None:
    config.data_dir = FLAGS.data_dir
  if FLAGS.batch_size is not None:
    config.batch_size = FLAGS.batch_size
  if FLAGS.split is not None:
    config.eval_split = FLAGS.split
  try:
    run, variables = restore(config)
  except checkpoint.CheckpointError as error:
    checkpoint.exit_with(error, 'eval.py')
  metrics = run.evaluate(variables)
  title = detection_figure.run_title(config)
  detection = isinstance(run.task, tasks.Detection)
  if FLAGS.routing_png:
    if detection:
      by_layer = routing_analysis.routing_by_layer(run, variables)
      if jax.process_index() == 0:
        routing_analysis.plot_layers(by_layer, FLAGS.routing_png, title)
    else:
      by_class = routing_analysis.routing_by_class(run, variables)
      if jax.process_index() == 0:
        routing_analysis.plot(by_class, FLAGS.routing_png, title)
      metrics['routing_class_specificity'] = {
          layer: routing_analysis.class_specificity(weights)
          for layer, weights in by_class.items()}
    metrics['routing_png'] = FLAGS.routing_png
  if FLAGS.detections_png:
    if not detection:
      raise app.UsageError('--detections_png needs a detection model.')
    detection_figure.write(run, variables, FLAGS.detections_png,
                           FLAGS.num_images, FLAGS.min_score, title)
    metrics['detections_png'] = FLAGS.detections_png
  if jax.process_index() == 0:
    print(json.dumps(metrics, indent=2))


if __name__ == '__main__':
  app.run(main)
