"""Workdirs on gs://, against a real GCS server running locally
(fake-gcs-server, tests/gcs_emulator.py): checkpoints, config.json,
metrics.jsonl, summary.json, TensorBoard and the routing PNG all land in the
bucket, and a stopped run resumes from there exactly."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath
from flax import traverse_util

from condconv_jax.training import routing_analysis, trainer
from tests import tiny
from tests.test_fashion_mnist import write_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(state):
  return traverse_util.flatten_dict(jax.device_get(state.params), sep='/')


@pytest.mark.slow  # end-to-end: `pytest -m slow`
def test_a_run_on_gcs_is_stopped_and_resumed_exactly(tmp_path, monkeypatch,
                                                     gcs_bucket):
  monkeypatch.chdir(tmp_path)  # nothing may land under <cwd>/gs:
  cfg = tiny.config(num_train_steps=6, checkpoint_every_steps=2,
                    log_every_steps=2)
  straight, _ = trainer.train_and_evaluate(cfg, tmp_path / 'local',
                                           dataset=tiny.dataset(cfg))

  def preempt_at_3(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  workdir = f'{gcs_bucket}/run'
  first, summary = trainer.train_and_evaluate(
      cfg, workdir, dataset=tiny.dataset(cfg), step_hooks=[preempt_at_3])
  assert summary['preempted'] and int(first.step) == 3
  remote = epath.Path(workdir)
  assert sorted(int(p.name) for p in (remote / 'checkpoints').iterdir()
                if p.name.isdigit()) == [2, 3]
  resumed, summary = trainer.train_and_evaluate(cfg, workdir,
                                                dataset=tiny.dataset(cfg))
  assert not summary['preempted'] and int(resumed.step) == 6
  a, b = _params(straight), _params(resumed)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  names = {p.name for p in remote.iterdir()}
  assert {'checkpoints', 'config.json', 'metrics.jsonl', 'summary.json',
          'tensorboard'} <= names
  lines = (remote / 'metrics.jsonl').read_text().splitlines()
  assert [line.split(',')[0] for line in lines] == [
      '{"step": 2', '{"step": 4', '{"step": 6', '{"step": 6']
  events = list((remote / 'tensorboard').iterdir())
  assert len(events) == 2  # one file per run segment
  assert all(e.name.startswith('events.out.tfevents') and e.stat().length
             for e in events)
  assert '"eval_count": 10.0' in (remote / 'summary.json').read_text()
  run, variables = trainer.restore_for_eval(cfg, workdir,
                                            dataset=tiny.dataset(cfg))
  png = remote / 'routing.png'
  routing_analysis.plot(routing_analysis.routing_by_class(run, variables),
                        str(png))
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert not os.path.exists(tmp_path / 'gs:')


@pytest.mark.slow  # end-to-end: `pytest -m slow`
def test_train_and_eval_command_lines_on_gcs(tmp_path, gcs_bucket):
  data_dir = write_fashion_mnist(tmp_path / 'fashion', 32, 8)
  workdir = f'{gcs_bucket}/fashion'
  common = dict(cwd=tmp_path, capture_output=True, text=True, timeout=600)
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'train.py'), '--config',
       os.path.join(ROOT, 'configs/fashion_mnist.py'), '--workdir', workdir,
       f'--config.data_dir={data_dir}', '--config.num_train_steps=2',
       '--config.batch_size=16', '--config.compare_num_experts=(2,)'],
      **common)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (epath.Path(workdir) / 'compare.json').exists()
  png = f'{workdir}/routing.png'
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'eval.py'), '--workdir',
       f'{workdir}/experts_2', '--routing_png', png], **common)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '"count": 8.0' in result.stdout
  assert epath.Path(png).read_bytes()[:4] == b'\x89PNG'
  assert not os.path.exists(tmp_path / 'gs:')
