"""Trains (and evaluates) a model from an ml-collections config file.

  python train.py --config configs/fashion_mnist.py --workdir /tmp/fashion
  python train.py --config configs/imagenet/efficientnet_b0_cc8.py \
      --workdir gs://bucket/cc8 --config.batch_size=1024

The run resumes from --workdir by itself; the workdir may be local or any
URI etils.epath handles (gs://...), and on several hosts it must be one
shared location. SIGTERM (a preemption notice) saves the current step on
every process and exits; rerun the same command to resume. Multi-host (TPU
pods, multi-GPU): pass --distributed (jax.distributed.initialize()
auto-detects the cluster), or --coordinator_address/--num_processes/
--process_id explicitly.
"""

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from condconv_jax import cpu_setup, paths
from condconv_jax.training import (checkpoint, comparison, detection_figure,
                                   detection_report, distributed, trainer)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, logs and the config.')
flags.mark_flags_as_required(['config', 'workdir'])


def detector_report(config, run_dir):
  """A trained detector's test report at a score threshold chosen on
  validation (metrics, with validation AP), and its pictures."""
  run, variables = trainer.restore_for_eval(config, run_dir)
  metrics, evaluator = detection_report.evaluate(run, variables)
  metrics.update(detection_report.write_pictures(
      run, variables, evaluator, metrics, run_dir,
      detection_figure.run_title(config)))
  return metrics


def compare(config, workdir):
  """Trains one run per config.compare_num_experts (and per
  config.compare_seeds: workdir/seed_S/experts_E); prints them together."""
  seeds = tuple(config.compare_seeds)
  rows = []
  for seed in seeds or (config.seed,):
    for num_experts in config.compare_num_experts:
      run = config.copy_and_resolve_references()
      with run.unlocked():
        run.num_experts = num_experts
        run.seed = seed
        run.compare_num_experts = ()
        run.compare_seeds = ()
      run_dir = workdir / f'experts_{num_experts}'
      if seeds:
        run_dir = workdir / f'seed_{seed}' / f'experts_{num_experts}'
      _, summary = trainer.train_and_evaluate(run, run_dir)
      if summary['preempted']:
        return  # rerun the same command: finished runs are not repeated
      if 'eval_AP' in summary:  # a detector: threshold, P/R, pictures
        report = detector_report(run, run_dir)
        summary.update({f'eval_{k}' if not k.startswith('validation_') else
                        k: v for k, v in report.items()})
        paths.write_json(run_dir / 'summary.json', summary)
      rows.append((seed, num_experts, summary))
  if jax.process_index() == 0:
    print(comparison.table(config, rows))
    paths.write_json(workdir / 'compare.json',
                     {f'seed_{seed}/experts_{e}' if seeds else str(e): s
                      for seed, e, s in rows})


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # XLA's per-step temporaries page-fault under glibc's malloc; re-executes
  # once with tcmalloc preloaded when installed (condconv_jax/cpu_setup.py).
  cpu_setup.use_tcmalloc()
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  distributed.initialize()
  config = FLAGS.config
  workdir = paths.as_path(FLAGS.workdir)
  try:
    if config.compare_num_experts:
      compare(config, workdir)
    else:
      _, summary = trainer.train_and_evaluate(config, workdir)
      if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))
  except checkpoint.CheckpointError as error:
    checkpoint.exit_with(error, 'train.py')


if __name__ == '__main__':
  app.run(main)
