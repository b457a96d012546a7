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
boxes on the first --num_images images of the evaluation split (--split),
and with --pr_png their box precision-recall curve (deepforest's, IoU 0.4).
Detectors report box precision and recall at --score_threshold, else the
config's, else the best-F1 threshold of the validation split (evaluated
first, never the split reported). A --workdir holding the runs of a
comparison (train.py with config.compare_num_experts: experts_E/ or
seed_S/experts_E/) evaluates each of them, with one curve per run in
--pr_png and one row per run in --detections_png.
Multi-host: the same flags as train.py (--distributed, or
--coordinator_address/--num_processes/--process_id).
"""

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from condconv_jax import config_schema, convert, cpu_setup, paths
from condconv_jax.training import (checkpoint, detection_figure,
                                   detection_report, distributed,
                                   routing_analysis, trainer)

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
flags.DEFINE_string('pr_png', None, 'Detectors: write the box precision-'
                    'recall curve here.')
flags.DEFINE_integer('num_images', 4, 'Images in --detections_png.')
flags.DEFINE_float('score_threshold', None,
                   'Detectors: detections counted (box precision and '
                   'recall) and drawn score at least this (default: the '
                   'config\'s, else chosen on the validation split).')
flags.DEFINE_string('split', None, 'Overrides config.eval_split.')
flags.DEFINE_string('data_dir', None, 'Overrides config.data_dir.')
flags.DEFINE_integer('batch_size', None, 'Overrides config.batch_size.')
flags.mark_flags_as_mutual_exclusive(['workdir', 'checkpoint'], required=True)


def runs(source):
  """The training workdirs to evaluate: --workdir itself, or the runs of a
  comparison under it."""
  root = paths.as_path(source)
  if (root / 'config.json').exists() or not FLAGS.workdir:
    return [source]
  found = sorted(str(d.parent) for pattern in ('experts_*/config.json',
                                               'seed_*/experts_*/config.json')
                 for d in root.glob(pattern))
  if not found:
    raise app.UsageError(f'{source} holds no config.json, and no runs of a '
                         'comparison (experts_*/ or seed_*/experts_*/): pass '
                         'a training workdir.')
  return found


def restore(config, source):
  """(trainer, variables), replicated over the mesh of every process."""
  if FLAGS.workdir:
    return trainer.restore_for_eval(config, source, FLAGS.step)
  run = trainer.Trainer(config)
  target = run.replicated_like(run.abstract_variables())
  return run, convert.load_variables(source, target)


def load_config(source):
  config = FLAGS.config or config_schema.load_config(source)
  if FLAGS.data_dir is not None:
    config.data_dir = FLAGS.data_dir
  if FLAGS.batch_size is not None:
    config.batch_size = FLAGS.batch_size
  if FLAGS.split is not None:
    config.eval_split = FLAGS.split
  return config


def evaluate_run(source, pictures):
  """One run's metrics; detectors add their pictures' rows to `pictures`."""
  config = load_config(source)
  try:
    run, variables = restore(config, source)
  except checkpoint.CheckpointError as error:
    checkpoint.exit_with(error, 'eval.py')
  title = detection_figure.run_title(config)
  detector = detection_report.is_detector(run)
  if (FLAGS.detections_png or FLAGS.pr_png) and not detector:
    raise app.UsageError('--detections_png and --pr_png need a detection '
                         'model.')
  if detector:
    metrics, evaluator = detection_report.evaluate(
        run, variables, score_threshold=FLAGS.score_threshold)
    if jax.process_index() == 0:
      metrics['per_image'] = detection_report.per_image(
          evaluator, metrics['score_threshold'])
    if FLAGS.detections_png:
      pictures['rows'].append((
          f'{config.num_experts} experts: ',
          detection_figure.images_of(run, variables, evaluator,
                                     FLAGS.num_images),
          metrics['score_threshold']))
    if evaluator.curve is not None:
      pictures['curves'][f'{config.num_experts} experts, seed '
                         f'{config.seed}'] = (evaluator.curve,
                                              metrics['score_threshold'])
    pictures['title'] = (title if len(pictures['curves']) == 1 else
                         f'{config.model}, {config.dataset} '
                         f'{config.eval_split}'.strip())
  else:
    metrics = run.evaluate(variables)
  if FLAGS.routing_png:
    if detector:
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
  return metrics


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # XLA's per-step temporaries page-fault under glibc's malloc; re-executes
  # once with tcmalloc preloaded when installed (condconv_jax/cpu_setup.py).
  cpu_setup.use_tcmalloc()
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  distributed.initialize()
  sources = runs(FLAGS.workdir or FLAGS.checkpoint)
  if FLAGS.routing_png and len(sources) > 1:
    raise app.UsageError('--routing_png takes one run: pass its workdir.')
  pictures = {'rows': [], 'curves': {}, 'title': ''}
  results = {source: evaluate_run(source, pictures) for source in sources}
  if jax.process_index() == 0:
    if FLAGS.detections_png:
      detection_figure.plot_rows(pictures['rows'], FLAGS.detections_png,
                                 pictures['title'])
    if FLAGS.pr_png:
      detection_figure.plot_pr(pictures['curves'], FLAGS.pr_png)
    for source, metrics in results.items():
      if FLAGS.detections_png:
        metrics['detections_png'] = FLAGS.detections_png
      if FLAGS.pr_png:
        metrics['pr_png'] = FLAGS.pr_png
    print(json.dumps(results[sources[0]] if len(sources) == 1 else results,
                     indent=2))


if __name__ == '__main__':
  app.run(main)
