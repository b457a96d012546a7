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
from condconv_jax.training import (checkpoint, detection_figure, distributed,
                                   trainer)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, logs and the config.')
flags.mark_flags_as_required(['config', 'workdir'])


def write_detections_png(config, run_dir):
  """run_dir/detections.png: the first evaluation images with ground truth
  and detections (what eval.py --detections_png draws)."""
  run, variables = trainer.restore_for_eval(config, run_dir)
  path = run_dir / 'detections.png'
  detection_figure.write(run, variables, path,
                         title=detection_figure.run_title(config))
  if jax.process_index() == 0:
    print(f'detections: {path}')


def compare(config, workdir):
  """Trains one run per config.compare_num_experts; prints them together."""
  rows = []
  for num_experts in config.compare_num_experts:
    run = config.copy_and_resolve_references()
    with run.unlocked():
      run.num_experts = num_experts
      run.compare_num_experts = ()
    _, summary = trainer.train_and_evaluate(run,
                                            workdir / f'experts_{num_experts}')
    if summary['preempted']:
      return  # rerun the same command: finished runs are not repeated
    if 'eval_AP' in summary:  # a detector: a picture of it at work
      write_detections_png(run, workdir / f'experts_{num_experts}')
    rows.append((num_experts, summary))
  if jax.process_index() == 0:
    metrics = (('AP', 'AP50') if 'eval_AP' in rows[0][1] else ('accuracy',))
    split = config.eval_split or 'evaluation split'
    print(f'\n{config.model} on {config.dataset} ({split}), seed '
          f'{config.seed}')
    print(f'| experts | params | MADDs | {" | ".join(metrics)} | examples |')
    print('|---:|---:|---:|' + '---:|' * len(metrics) + '---:|')
    for num_experts, s in rows:
      values = ' | '.join(f'{100 * s[f"eval_{m}"]:.2f}%' for m in metrics)
      print(f'| {num_experts} | {s["params"]:,} | {s["macs"] / 1e6:.2f}M | '
            f'{values} | {int(s["eval_count"])} |')
    paths.write_json(workdir / 'compare.json',
                     {str(e): s for e, s in rows})


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
