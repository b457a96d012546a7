"""A tiny training run in its own process, for the multi-device and
multi-process tests: writes the final params to --out and prints the run's
summary as JSON on its last stdout line.

  python tests/tiny_run.py --workdir W --out params.npz [--steps N]
      [--coordinator 127.0.0.1:PORT --num_processes 2 --process_id I]
      [--detection] [--config.FIELD=VALUE ...]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--coordinator')
  parser.add_argument('--num_processes', type=int)
  parser.add_argument('--process_id', type=int)
  parser.add_argument('--detection', action='store_true',
                      help='the toy tree-crown detector instead')
  args, overrides = parser.parse_known_args()
  import jax  # pylint: disable=g-import-not-at-top
  if args.coordinator:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(args.coordinator, args.num_processes,
                               args.process_id)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from tests import tiny  # pylint: disable=g-import-not-at-top
  from condconv_jax.training import trainer  # pylint: disable=g-import-not-at-top
  fields = {}
  for item in overrides:  # --config.FIELD=VALUE, VALUE a Python literal
    key, value = item.removeprefix('--config.').split('=', 1)
    fields[key] = json.loads(value)
  if args.detection:
    config = tiny.detection_config(num_train_steps=args.steps, **fields)
    dataset = None  # the real data (data/deepforest)
  else:
    config = tiny.config(num_train_steps=args.steps, **fields)
    dataset = tiny.dataset(config)
  state, summary = trainer.train_and_evaluate(config, args.workdir,
                                              dataset=dataset)
  params = traverse_util.flatten_dict(jax.device_get(state.params), sep='/')
  np.savez(args.out, eval_count=summary.get('eval_count', -1),
           devices=jax.device_count(), **params)
  print(json.dumps(summary))


if __name__ == '__main__':
  main()
