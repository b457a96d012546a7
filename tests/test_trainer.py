"""End-to-end training: steps, evaluation, devices, processes, preemption."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from condconv_jax.data import common
from condconv_jax.training import checkpoint, routing_analysis, trainer
from tests import tiny
from tests.test_fashion_mnist import write_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flat_params(state):
  return traverse_util.flatten_dict(jax.device_get(state.params), sep='/')


def test_train_step_and_eval_on_mock_imagenet(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  cfg = tiny.config(dataset='imagenet2012', image_size=32, batch_size=4,
                    num_train_steps=2, augment='inception')
  with tfds.testing.mock_data(num_examples=10,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    state, summary = trainer.train_and_evaluate(cfg, str(tmp_path))
  assert int(state.step) == 2
  assert summary['eval_count'] == 10  # 3 batches of 4, the last padded
  assert np.isfinite(summary['eval_loss'])
  assert os.path.exists(tmp_path / 'config.json')
  assert glob.glob(str(tmp_path / 'tensorboard' / 'events.out.tfevents.*'))
  assert (tmp_path / 'metrics.jsonl').read_text().count('"split": "train"')


def normalized(images):
  """tiny.dataset's normalization (mean 0.5, std 0.3 of [0, 1] pixels)."""
  return (images.astype(np.float32) / 255 - 0.5) / 0.3


def test_evaluation_counts_every_example_once(tmp_path):
  cfg = tiny.config(num_train_steps=2, batch_size=8)
  ds = tiny.dataset(cfg, num_test=13)  # 13 = 8 + 5: the last batch is short
  state, summary = trainer.train_and_evaluate(cfg, str(tmp_path), dataset=ds)
  assert summary['eval_count'] == 13
  # Independently: the EMA model applied to all 13 examples at once.
  model = trainer.build_model(cfg, tiny.NUM_CLASSES)
  images, labels = ds.test
  logits = model.apply(state.eval_variables(True), normalized(images))
  expected = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
  assert summary['eval_accuracy'] == pytest.approx(expected, abs=1e-6)


def test_padding_never_counts_as_correct():
  """The 3 padded examples of the last batch are zero images with label 0;
  a model that predicts class 0 for everything must still score only the
  real examples of class 0."""
  cfg = tiny.config(batch_size=8)
  ds = tiny.dataset(cfg, num_test=13)
  run = trainer.Trainer(cfg, ds)
  variables = jax.tree.map(np.array, run.eval_variables(run.init_state()))
  variables['params']['classifier']['fc']['bias'][:, 0] = 1e4  # [E, C]
  metrics = run.evaluate(variables)
  labels = ds.test[1]
  assert metrics['count'] == 13
  assert metrics['accuracy'] == pytest.approx(np.mean(labels == 0))


def test_interrupt_and_resume_reproduce_the_uninterrupted_run(tmp_path):
  cfg = tiny.config(num_train_steps=6)
  straight, _ = trainer.train_and_evaluate(cfg, str(tmp_path / 'straight'),
                                           dataset=tiny.dataset(cfg))

  def preempt_at_3(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  workdir = str(tmp_path / 'resumed')
  first, summary = trainer.train_and_evaluate(
      cfg, workdir, dataset=tiny.dataset(cfg), step_hooks=[preempt_at_3])
  assert summary['preempted'] and int(first.step) == 3
  resumed, summary = trainer.train_and_evaluate(cfg, workdir,
                                                dataset=tiny.dataset(cfg))
  assert not summary['preempted'] and int(resumed.step) == 6
  a, b = flat_params(straight), flat_params(resumed)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  np.testing.assert_array_equal(
      jax.tree.leaves(straight.ema_params)[0],
      jax.tree.leaves(resumed.ema_params)[0])


class _NaNAtStep2(common.ArrayDataset):
  """Float images (the normalization takes any dtype), NaN at step 2."""

  def train_batches(self, start_step=0):
    for step, batch in enumerate(super().train_batches(start_step),
                                 start_step):
      batch['image'] = batch['image'].astype(np.float32)
      if step == 2:
        batch['image'][:] = np.nan
      yield batch


def test_non_finite_loss_raises_naming_the_step(tmp_path):
  cfg = tiny.config(num_train_steps=5, checkpoint_every_steps=100)
  base_ds = tiny.dataset(cfg)
  ds = _NaNAtStep2(base_ds.train, base_ds.test, tiny.NUM_CLASSES,
                   cfg.batch_size, cfg.seed, 0.5, 0.3)
  with pytest.raises(FloatingPointError, match='at step 2'):
    trainer.train_and_evaluate(cfg, str(tmp_path), dataset=ds)


def _run(args, env=None, timeout=600):
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def assert_close_in_norm(actual, expected, name, rtol=1e-4):
  """|a - b| <= rtol |b| over the whole tensor: float reductions in another
  order move single small entries, never the tensor."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected)
  error = np.linalg.norm(actual - expected)
  assert error <= rtol * max(np.linalg.norm(expected), 1e-6), (name, error)


@pytest.mark.slow  # end-to-end: `pytest -m slow`
def test_four_fake_devices_give_the_same_step_as_one(tmp_path):
  outs = {}
  for devices in (1, 4):
    env = {**os.environ,
           'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
    out = str(tmp_path / f'{devices}.npz')
    result = _run(['tests/tiny_run.py', '--workdir',
                   str(tmp_path / f'w{devices}'), '--out', out, '--steps',
                   '1'], env)
    assert result.returncode == 0, result.stderr[-3000:]
    outs[devices] = dict(np.load(out))
  assert outs[1].pop('devices') == 1 and outs[4].pop('devices') == 4
  # Equal up to the order of float reductions across devices (BatchNorm
  # statistics over the global batch; per-device statistics would differ by
  # orders of magnitude more).
  for name, value in outs[1].items():
    assert_close_in_norm(outs[4][name], value, name)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow  # end-to-end: `pytest -m slow`
def test_two_processes_train_a_step_and_agree(tmp_path):
  coordinator = f'127.0.0.1:{_free_port()}'
  env = {**os.environ,
         'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  procs = [subprocess.Popen(
      [sys.executable, 'tests/tiny_run.py', '--workdir', str(tmp_path / 'w'),
       '--out', str(tmp_path / f'p{i}.npz'), '--coordinator', coordinator,
       '--num_processes', '2', '--process_id', str(i), '--steps', '1'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  p0, p1 = (dict(np.load(tmp_path / f'p{i}.npz')) for i in range(2))
  assert p0['devices'] == 4  # 2 processes x 2 devices: one global mesh
  assert p0['eval_count'] == 10  # every example once, across processes
  single = tmp_path / 'single.npz'
  result = _run(['tests/tiny_run.py', '--workdir', str(tmp_path / 's'),
                 '--out', str(single), '--steps', '1'])
  assert result.returncode == 0, result.stderr[-3000:]
  single = dict(np.load(single))
  for name in p0:
    np.testing.assert_array_equal(p0[name], p1[name], err_msg=name)
    if name != 'devices':
      assert_close_in_norm(p0[name], single[name], name)


def _start_processes(workdirs, coordinator, steps, *extra):
  """One tests/tiny_run.py per workdir; several join one job at
  `coordinator`."""
  env = {**os.environ,
         'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  job = (['--coordinator', coordinator, '--num_processes',
          str(len(workdirs))] if len(workdirs) > 1 else [])
  return [subprocess.Popen(
      [sys.executable, 'tests/tiny_run.py', '--workdir', str(workdir),
       '--out', f'{workdir}_{i}.npz', *job,
       *(['--process_id', str(i)] if job else []),
       '--steps', str(steps), *extra],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i, workdir in enumerate(workdirs)]


def _finish(procs, timeout=600):
  results = []
  for p in procs:
    out, err = p.communicate(timeout=timeout)
    results.append((p.returncode, out, err))
  return results


@pytest.mark.slow  # end-to-end: `pytest -m slow`
def test_sigterm_to_one_of_two_processes_saves_the_same_step(tmp_path):
  """Preemption on a pod: SIGTERM reaches one host (here process 1, not the
  one that writes the metrics); every process must stop at the same step,
  that step's checkpoint must be written, and rerunning resumes from it."""
  workdir = tmp_path / 'w'
  procs = _start_processes([workdir] * 2, f'127.0.0.1:{_free_port()}',
                           100_000, '--config.checkpoint_every_steps=100000',
                           '--config.log_every_steps=5')
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().count('\n') >= 2):
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  results = _finish(procs)
  summaries = []
  for returncode, out, err in results:
    assert returncode == 0, err[-3000:]
    summaries.append(json.loads(out.strip().splitlines()[-1]))
  saved = summaries[0]['step']
  assert all(s['preempted'] and s['step'] == saved for s in summaries)
  assert 10 <= saved < 100_000
  assert (workdir / 'checkpoints' / str(saved)).is_dir()
  # Rerun to two steps past the preemption, logging every step: it resumes
  # at the saved step (a restart from 0 would log steps 1..saved+2).
  results = _finish(_start_processes(
      [workdir] * 2, f'127.0.0.1:{_free_port()}', saved + 2,
      '--config.checkpoint_every_steps=100000', '--config.log_every_steps=1'))
  for returncode, out, err in results:
    assert returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert not summary['preempted'] and summary['step'] == saved + 2
  logged = [json.loads(line)['step'] for line in
            metrics.read_text().splitlines()
            if json.loads(line)['split'] == 'train']
  assert logged[-2:] == [saved + 1, saved + 2]
  assert [s for s in logged if s <= saved] == list(range(5, saved + 1, 5))


def test_workdir_not_shared_between_processes_is_an_error(tmp_path):
  """Two 'hosts' each given a local folder: an error on both, before any
  step, instead of two diverging sets of checkpoints."""
  results = _finish(_start_processes([tmp_path / 'host0', tmp_path / 'host1'],
                                     f'127.0.0.1:{_free_port()}', 2))
  for returncode, _, err in results:
    assert returncode != 0
    assert 'is not shared by all 2 processes' in err, err[-3000:]
  assert not (tmp_path / 'host0' / 'checkpoints').exists()
  assert not (tmp_path / 'host1' / 'checkpoints').exists()


def test_unknown_config_key_errors():
  result = _run(['train.py', '--config', 'configs/fashion_mnist.py',
                 '--workdir', '/tmp/unused', '--config.lerning_rate=0.1'])
  assert result.returncode != 0
  assert 'lerning_rate' in result.stderr
  cfg = tiny.config()
  with pytest.raises(AttributeError):
    cfg.lerning_rate = 0.1  # locked: a typo in a config file errors too


def _snapshot(folder):
  return {f: open(f, 'rb').read() for f in glob.glob(str(folder / '**'),
                                                     recursive=True)
          if os.path.isfile(f)}


def test_corrupt_checkpoint_is_reported_and_kept(tmp_path):
  cfg = tiny.config(num_train_steps=4, checkpoint_every_steps=2)
  trainer.train_and_evaluate(cfg, str(tmp_path), dataset=tiny.dataset(cfg))
  # The array data of step 4 (metadata intact): the restore starts, then
  # fails in tensorstore.
  for f in glob.glob(str(tmp_path / 'checkpoints' / '4' / '**' / 'd' / '*'),
                     recursive=True):
    with open(f, 'wb') as handle:
      handle.write(b'garbage')
  before = _snapshot(tmp_path)
  with pytest.raises(checkpoint.CheckpointError,
                     match='step 4 .* could not be restored.*resumes from '
                     'step 2'):
    trainer.restore_for_eval(cfg, str(tmp_path), dataset=tiny.dataset(cfg))
  assert _snapshot(tmp_path) == before


@pytest.mark.slow  # end-to-end: `pytest -m slow`
def test_corrupt_checkpoint_gives_one_message_on_the_command_line(tmp_path):
  data_dir = write_fashion_mnist(tmp_path / 'fashion', 32, 8)
  workdir = tmp_path / 'run'
  result = _run(['train.py', '--config', 'configs/fashion_mnist.py',
                 '--workdir', str(workdir), f'--config.data_dir={data_dir}',
                 '--config.num_train_steps=2', '--config.batch_size=16',
                 '--config.compare_num_experts=()'])
  assert result.returncode == 0, result.stderr[-3000:]
  for f in glob.glob(str(workdir / 'checkpoints' / '2' / '**' / 'd' / '*'),
                     recursive=True):
    with open(f, 'wb') as handle:
      handle.write(b'garbage')
  before = _snapshot(workdir)
  for script in ('eval.py', 'train.py'):
    args = ['--workdir', str(workdir)]
    if script == 'train.py':
      args += ['--config', 'configs/fashion_mnist.py',
               f'--config.data_dir={data_dir}', '--config.batch_size=16',
               '--config.num_train_steps=4', '--config.compare_num_experts=()']
    result = _run([script, *args])
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f'{script}: checkpoint of step 2')
    assert 'Traceback' not in result.stderr + result.stdout
  assert _snapshot(workdir) == before


@pytest.mark.slow  # end-to-end: `pytest -m slow`
def test_routing_analysis_matches_direct_computation(tmp_path):
  cfg = tiny.config(num_train_steps=2, ema_decay=0.0)
  ds = tiny.dataset(cfg, num_test=10)
  trainer.train_and_evaluate(cfg, str(tmp_path), dataset=ds)
  run, variables = trainer.restore_for_eval(cfg, str(tmp_path), dataset=ds)
  by_class = routing_analysis.routing_by_class(run, variables)
  # Keyed by the CondConv (or block) that owns the routing function.
  assert set(by_class) >= {'sep4_dw', 'sep6_pw', 'classifier/fc'}
  images, labels = ds.test
  _, inter = run.model.apply(variables, normalized(images),
                             mutable=['intermediates'])
  weights = np.asarray(
      inter['intermediates']['sep5_pw']['routing']['routing_weights'][0])
  for c in range(tiny.NUM_CLASSES):
    if np.any(labels == c):
      np.testing.assert_allclose(by_class['sep5_pw'][c],
                                 weights[labels == c].mean(0), rtol=1e-5)
  png = tmp_path / 'routing.png'
  routing_analysis.plot(by_class, str(png))
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow  # end-to-end: `pytest -m slow`
def test_train_and_eval_command_lines(tmp_path):
  data_dir = write_fashion_mnist(tmp_path / 'fashion', 64, 20)
  workdir = tmp_path / 'run'
  result = _run(['train.py', '--config', 'configs/fashion_mnist.py',
                 '--workdir', str(workdir), f'--config.data_dir={data_dir}',
                 '--config.num_train_steps=2', '--config.batch_size=16',
                 '--config.compare_num_experts=(0, 2)'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert '| 2 | ' in result.stdout and '| 0 | ' in result.stdout
  png = tmp_path / 'routing.png'
  result = _run(['eval.py', '--workdir', str(workdir / 'experts_2'),
                 '--routing_png', str(png)])
  assert result.returncode == 0, result.stderr[-3000:]
  assert '"count": 20.0' in result.stdout
  assert png.exists()


@pytest.mark.slow  # end-to-end: `pytest -m slow`
def test_a_condconv_run_starts_upcycled_from_a_static_run(tmp_path):
  static_cfg = tiny.config(num_experts=0)
  dataset = tiny.dataset(static_cfg)
  trainer.train_and_evaluate(static_cfg, tmp_path / 'static', dataset=dataset)
  static_run, static_variables = trainer.restore_for_eval(
      static_cfg, tmp_path / 'static', dataset=dataset)
  cfg = tiny.config(num_experts=4, init_from=str(tmp_path / 'static'))
  run = trainer.Trainer(cfg, dataset)
  state = run.upcycled_state(run.init_state(), cfg.init_from)
  # Step 0: the static model's logits (its EMA weights, what it evaluates).
  images = run.normalize(next(dataset.eval_batches())['image'])
  np.testing.assert_allclose(
      run.model.apply(run.eval_variables(state), images),
      static_run.model.apply(static_variables, images), rtol=1e-5,
      atol=1e-5)
  assert int(state.step) == 0
  # The run trains from there, and resumes from its own checkpoints.
  def preempt_at_2(step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  first, summary = trainer.train_and_evaluate(
      cfg, tmp_path / 'cc', dataset=dataset, step_hooks=[preempt_at_2])
  assert summary['preempted'] and int(first.step) == 2
  resumed, summary = trainer.train_and_evaluate(cfg, tmp_path / 'cc',
                                                dataset=dataset)
  assert int(resumed.step) == cfg.num_train_steps
  with pytest.raises(ValueError, match='is a CondConv run'):
    trainer.load_static_variables(tmp_path / 'cc')
  other = tiny.config(num_experts=4, width=0.5)
  with pytest.raises(ValueError, match=r"not this model's static twin: "
                     r'width \(0.25 there, 0.5 here\)'):
    trainer.load_static_variables(tmp_path / 'static', dataset, other)
  with pytest.raises(ValueError, match='set config.num_experts > 0'):
    trainer.train_and_evaluate(tiny.config(num_experts=0,
                                           init_from=cfg.init_from),
                               tmp_path / 'nope', dataset=dataset)
  with pytest.raises(FileNotFoundError, match='neither a training workdir'):
    trainer.load_static_variables(tmp_path / 'nowhere')
