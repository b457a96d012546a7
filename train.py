"""Trains (and evaluates) a model from an ml-collections config file.

  python train.py --config configs/fashion_mnist.py --workdir /tmp/fashion
  python train.py --config configs/imagenet/efficientnet_b0_cc8.py \
      --workdir gs://bucket/cc8 --config.batch_size=1024

The run resumes from --workdir by itself. Multi-host (TPU pods, multi-GPU):
pass --distributed (jax.distributed.initialize() auto-detects the cluster), or
--coordinator_address/--num_processes/--process_id explicitly.
"""

import json
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from condconv_jax.training import trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, logs and the config.')
flags.DEFINE_bool('distributed', False,
                  'Call jax.distributed.initialize() (cluster auto-detected).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
flags.DEFINE_integer('process_id', None, 'This process index.')
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed():
  if FLAGS.coordinator_address or FLAGS.distributed:
    # CPU-only jobs need gloo for cross-process collectives.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)


def compare(config, workdir):
  """Trains one run per config.compare_num_experts; prints them together."""
  rows = []
  for num_experts in config.compare_num_experts:
    run = config.copy_and_resolve_references()
    with run.unlocked():
      run.num_experts = num_experts
      run.compare_num_experts = ()
    _, summary = trainer.train_and_evaluate(
        run, os.path.join(workdir, f'experts_{num_experts}'))
    rows.append((num_experts, summary))
  if jax.process_index() == 0:
    print(f'\n{config.model} on {config.dataset}, seed {config.seed}')
    print('| experts | params | MADDs | test accuracy | examples |')
    print('|---:|---:|---:|---:|---:|')
    for num_experts, s in rows:
      print(f'| {num_experts} | {s["params"]:,} | {s["macs"] / 1e6:.2f}M | '
            f'{100 * s.get("eval_accuracy", float("nan")):.2f}% | '
            f'{int(s.get("eval_count", 0))} |')
    with open(os.path.join(workdir, 'compare.json'), 'w') as f:
      json.dump({str(e): s for e, s in rows}, f, indent=2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  initialize_distributed()
  config = FLAGS.config
  if config.compare_num_experts:
    compare(config, FLAGS.workdir)
  else:
    _, summary = trainer.train_and_evaluate(config, FLAGS.workdir)
    if jax.process_index() == 0:
      print(json.dumps(summary, indent=2))


if __name__ == '__main__':
  app.run(main)
