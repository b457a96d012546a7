"""Evaluates a checkpoint on every example of the evaluation split.

  python eval.py --workdir /tmp/fashion/experts_8 [--step N] \
      [--routing_png routing.png] [--config configs/... --config.field=...]

--workdir is a training workdir (its latest checkpoint, or --step); the
config is the one the run wrote there unless --config is given. With
--routing_png it also writes the paper's routing analysis: the mean routing
weight per class for every CondConv layer.
"""

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from condconv_jax.training import routing_analysis, trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file (default: the workdir\'s config.json).',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Training workdir holding checkpoints/.')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
flags.DEFINE_string('routing_png', None, 'Write the routing analysis here.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  config = FLAGS.config or trainer.load_config(FLAGS.workdir)
  run, state = trainer.restore_for_eval(config, FLAGS.workdir, FLAGS.step)
  metrics = run.evaluate(state)
  if FLAGS.routing_png:
    by_class = routing_analysis.routing_by_class(run, state)
    routing_analysis.plot(by_class, FLAGS.routing_png,
                          title=f'{config.model}, {config.num_experts} experts')
    metrics['routing_png'] = FLAGS.routing_png
  if jax.process_index() == 0:
    print(json.dumps({'step': int(state.step), **metrics}, indent=2))


if __name__ == '__main__':
  app.run(main)
