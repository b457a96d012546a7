"""Exported models, run in their own runtimes, against the Flax model.

Each export is run where deployments run it (LiteRT's interpreter, ONNX
Runtime, `jax.export.deserialize`, TF's SavedModel loader) and compared with
`model.apply(..., train=False)` in JAX: the independent reference is the
Flax model itself, computed by XLA with XLA's own forms.
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condconv_jax import CondConv, export, target
from condconv_jax.export import runtimes
from condconv_jax.models import get_model
from tests.test_fashion_mnist import write_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4  # relative, the bar


class GroupedNet(nn.Module):
  """A grouped (not depthwise) CondConv and a grouped static conv."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.Conv(8, (3, 3), feature_group_count=2)(x)
    x = CondConv(12, 3, strides=2, feature_group_count=4, num_experts=3)(x)
    x = nn.relu(x)
    return CondConv(6, 1, feature_group_count=2, num_experts=3)(x).mean((1, 2))


def _model(name, **kwargs):
  if name == 'grouped':
    return GroupedNet(), (1, 12, 12, 4)
  if name == 'ssd_mobilenet_v1':
    return get_model(name, width=0.25, num_classes=3, **kwargs), (1, 64, 64, 3)
  if name == 'resnet18':  # max pooling; CondConv k x k and shortcut
    return (get_model(name, width=0.25, num_classes=5, **kwargs),
            (1, 32, 32, 3))
  if name == 'efficientnet_b0':
    # Shared routing per block (stages 5-7 conditional), SE, swish.
    return (get_model(name, width=0.25, num_classes=5, **kwargs),
            (1, 32, 32, 3))
  return get_model(name, width=0.25, num_classes=5, **kwargs), (1, 28, 28, 1)


def _trained_like(model, shape, seed=0):
  """Variables with non-trivial BatchNorm statistics (a fresh init's are
  0/1, which would hide a BatchNorm left in training form)."""
  x = jnp.zeros(shape)
  variables = model.init(jax.random.key(seed), x, train=False)
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [leaf + 0.1 * jax.random.uniform(k, leaf.shape, leaf.dtype)
            for leaf, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


def _images(shape, batch=None, seed=3):
  shape = (batch or shape[0], *shape[1:])
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _flax_outputs(model, variables, images):
  out = model.apply(variables, images, train=False)
  if isinstance(out, dict):
    return [np.asarray(out[k]) for k in sorted(out)]
  return [np.asarray(out)]


def _export_and_run(fmt, model, variables, shape, images, tmp_path):
  if fmt == 'tflite':
    return runtimes.run_tflite(export.to_tflite(model, variables, shape),
                               images)
  if fmt == 'onnx':
    return runtimes.run_onnx(export.to_onnx(model, variables, shape), images)
  if fmt == 'stablehlo':
    exported = export.to_stablehlo(model, variables, shape)
    return runtimes.run_stablehlo(bytes(exported.serialize()), images)
  path = tmp_path / 'saved'
  export.to_savedmodel(model, variables, shape, path)
  return runtimes.run_savedmodel(str(path), images)


def _check(fmt, name, tmp_path, batch_symbolic=False, **kwargs):
  model, shape = _model(name, **kwargs)
  variables = _trained_like(model, shape)
  export_shape = (None, *shape[1:]) if batch_symbolic else shape
  images = _images(shape, batch=3 if batch_symbolic else None)
  got = _export_and_run(fmt, model, variables, export_shape, images, tmp_path)
  want = _flax_outputs(model, variables, images)
  error = runtimes.relative_error(got, want)
  assert error <= TOLERANCE, (fmt, name, kwargs, error)
  return got


# The default run: every format once on a CondConv model with depthwise,
# pointwise and classifier CondConvs; the zoo's other kinds below (slow).
@pytest.mark.parametrize('fmt', ['tflite', 'onnx', 'stablehlo', 'savedmodel'])
def test_each_format_matches_flax_in_its_runtime(fmt, tmp_path):
  _check(fmt, 'mobilenet_v1_mini', tmp_path, num_experts=3)


@pytest.mark.parametrize('fmt', [
    'onnx',
    pytest.param('stablehlo', marks=pytest.mark.slow),  # `pytest -m slow`
    pytest.param('savedmodel', marks=pytest.mark.slow),
])
def test_a_symbolic_batch_runs_at_another_batch_size(fmt, tmp_path):
  outputs = _check(fmt, 'mobilenet_v1_mini', tmp_path, batch_symbolic=True,
                   num_experts=3)
  assert outputs[0].shape == (3, 5)


@pytest.mark.slow  # end-to-end: `pytest -m slow`
@pytest.mark.parametrize('fmt', ['tflite', 'onnx', 'stablehlo', 'savedmodel'])
@pytest.mark.parametrize('name,kwargs', [
    ('mobilenet_v1_mini', dict(num_experts=0)),
    ('efficientnet_b0', dict(num_experts=0)),
    ('efficientnet_b0', dict(num_experts=3)),  # shared routing, SE
    ('grouped', {}),
    ('resnet18', dict(num_experts=2)),
    ('ssd_mobilenet_v1', dict(num_experts=0)),
    ('ssd_mobilenet_v1', dict(num_experts=2)),  # CondConv box predictors
    ('mobilenet_v1_mini', dict(num_experts=3, conv_family='dyconv')),
    ('mobilenet_v1_mini', dict(num_experts=2, conv_family='odconv')),
])
def test_zoo_exports_match_flax(fmt, name, kwargs, tmp_path):
  _check(fmt, name, tmp_path, **kwargs)


def test_static_convs_reach_litert_as_its_own_conv_ops():
  """BatchNorm folded, depthwise as DEPTHWISE_CONV_2D, 1x1 as CONV_2D: the
  ops XNNPACK runs, not the XLA:CPU forms (matmuls, shifted slices)."""
  model, shape = _model('mobilenet_v1_mini', num_experts=0)
  variables = _trained_like(model, shape)
  interpreter = runtimes.tflite_interpreter(
      export.to_tflite(model, variables, shape))
  ops = [op['op_name'] for op in interpreter._get_ops_details()]  # pylint: disable=protected-access
  kernels = [k for k in jax.tree.leaves(variables['params']) if k.ndim == 4]
  # One input channel per group: a depthwise conv (the 1-channel stem too).
  depthwise = sum(k.shape[2] == 1 for k in kernels)
  assert ops.count('DEPTHWISE_CONV_2D') == depthwise == 7
  assert ops.count('CONV_2D') == len(kernels) - depthwise
  assert not {'SLICE', 'STRIDED_SLICE', 'BATCH_MATMUL', 'MUL'} & set(ops), ops


def test_forms_follow_the_target_and_restore_after():
  assert target.backend() == jax.default_backend()
  with target.exporting_for('onnx'):
    assert target.backend() == 'onnx'
  assert target.backend() == jax.default_backend()
  with pytest.raises(ValueError, match="one of litert, onnx; got 'tpu'"):
    with target.exporting_for('tpu'):
      pass


def test_bad_input_is_refused(tmp_path):
  model, shape = _model('mobilenet_v1_mini', num_experts=0)
  variables = _trained_like(model, shape)
  with pytest.raises(ValueError, match='LiteRT takes a fixed batch'):
    export.to_tflite(model, variables, (None, 28, 28, 1))
  with pytest.raises(ValueError, match='NHWC'):
    export.to_stablehlo(model, variables, (28, 28, 1))
  with pytest.raises(ValueError, match="quantize must be None or"):
    export.to_tflite(model, variables, shape, quantize='int4')
  folder = tmp_path / 'exists'
  folder.mkdir()
  with pytest.raises(FileExistsError, match='existing folder'):
    export.to_savedmodel(model, variables, shape, folder)
  # A shape the model cannot take fails in the converter's trace, leaving
  # no folder behind.
  with pytest.raises(Exception):
    export.to_savedmodel(model, variables, (1, 28, 28, 5), tmp_path / 'bad')
  assert not (tmp_path / 'bad').exists()
  assert [p.name for p in tmp_path.iterdir()] == ['exists']


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'condconv_jax.export', *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  """A 2-step Fashion-MNIST CondConv run (EMA kept), on random images."""
  root = tmp_path_factory.mktemp('run')
  data_dir = write_fashion_mnist(root / 'fashion', 32, 8)
  workdir = root / 'run'
  result = subprocess.run(
      [sys.executable, 'train.py', '--config', 'configs/fashion_mnist.py',
       '--workdir', str(workdir), f'--config.data_dir={data_dir}',
       '--config.num_train_steps=2', '--config.batch_size=16',
       '--config.compare_num_experts=()'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.slow  # end-to-end: `pytest -m slow`
@pytest.mark.parametrize('fmt', ['tflite', 'onnx', 'stablehlo', 'savedmodel'])
def test_command_line_exports_a_trained_run(fmt, trained_workdir, tmp_path):
  out = tmp_path / f'model.{fmt}'
  result = _cli('--workdir', str(trained_workdir), '--format', fmt,
                '--out', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'{fmt} -> {out}' in result.stdout
  assert 'check:' in result.stdout and 'max relative difference' in (
      result.stdout)
  assert out.exists()


@pytest.mark.slow  # end-to-end: `pytest -m slow`
def test_command_line_failures_leave_nothing_at_out(trained_workdir,
                                                    tmp_path):
  out = tmp_path / 'model.tflite'
  # A check that cannot pass: the export is made, then refused.
  result = _cli('--workdir', str(trained_workdir), '--format', 'tflite',
                '--out', str(out), '--tolerance', '0')
  assert result.returncode == 1
  assert 'differs from the Flax model' in result.stderr
  assert list(tmp_path.iterdir()) == []
  # A workdir without a checkpoint.
  empty = tmp_path / 'empty'
  (empty / 'checkpoints').mkdir(parents=True)
  (empty / 'config.json').write_text(
      (trained_workdir / 'config.json').read_text())
  result = _cli('--workdir', str(empty), '--format', 'onnx', '--out',
                str(out))
  assert result.returncode == 1 and 'no checkpoint in' in result.stderr
  assert not out.exists()
  result = _cli('--workdir', str(trained_workdir), '--format', 'onnx',
                '--out', str(out), '--quantize', 'dynamic_range')
  assert result.returncode != 0 and 'tflite only' in result.stderr


@pytest.mark.slow  # end-to-end: `pytest -m slow`
def test_command_line_exports_a_detector_without_post_processing(tmp_path):
  """The toy tree-crown detector (tests/tiny_run.py --detection, the
  deepforest wheel's images): raw per-anchor outputs, checked in ONNX
  Runtime; asking for post-processing is refused before any export."""
  workdir = tmp_path / 'detector'
  result = subprocess.run(
      [sys.executable, 'tests/tiny_run.py', '--workdir', str(workdir),
       '--out', str(tmp_path / 'params.npz'), '--detection', '--steps', '2'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = tmp_path / 'detector.onnx'
  result = _cli('--workdir', str(workdir), '--format', 'onnx', '--out',
                str(out), '--postprocess', 'nms')
  assert result.returncode != 0 and 'is not supported' in result.stderr
  assert not out.exists()
  result = _cli('--workdir', str(workdir), '--format', 'onnx', '--out',
                str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'outputs: box_offsets, class_logits (per anchor' in result.stdout
  session = runtimes.onnx_session(out.read_bytes())
  assert [o.name for o in session.get_outputs()] == ['box_offsets',
                                                     'class_logits']
