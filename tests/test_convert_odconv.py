"""Official ODConv (OSVAI/ODConv) -> Flax: output parity with a float64
PyTorch transcription of the official code (tests/odconv_torch.py).

The official checkpoints are not downloaded (no network): the transcription
is built with random weights, random biases and random BatchNorm statistics,
run in float64 and eval mode, and its state_dict converted; our model's
float32 logits must match within 1e-4 of the largest logit.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from condconv_jax import config_schema, convert
from condconv_jax.models import get_model
from tests import odconv_torch

IMAGE_SIZE = 64
PARITY = [('od_resnet18', 4), ('od_resnet18', 1), ('od_resnet50', 4),
          ('od_mobilenetv2_050', 4), ('od_mobilenetv2_050', 1)]


@pytest.fixture(autouse=True, scope='module')
def one_torch_thread():
  """PyTorch's two threads on this module's small convs are no faster than
  one, and ~500x slower when another process keeps the cores busy."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def official(arch, kernel_num, seed=0):
  torch.manual_seed(seed)
  return odconv_torch.randomize(
      odconv_torch.MODELS[arch](kernel_num=kernel_num), seed + 1)


def random_images(seed, batch=2):
  generator = torch.Generator().manual_seed(seed)
  return odconv_torch.random_images(batch, IMAGE_SIZE, generator)


def nhwc(images):
  return jnp.asarray(images.numpy().transpose(0, 2, 3, 1), jnp.float32)


def relative_error(logits, expected):
  return float(np.max(np.abs(np.asarray(logits, np.float64) - expected)) /
               np.max(np.abs(expected)))


def with_first_3x3_flipped(variables):
  """The variables with the taps of the first 3x3 ODConv kernel flipped."""
  flat = traverse_util.flatten_dict(variables['params'])
  path = next(p for p, v in sorted(flat.items())
              if p[-1] == 'kernel' and v.ndim == 5 and v.shape[1] == 3)
  flat[path] = flat[path][:, ::-1, ::-1]
  return {**variables, 'params': traverse_util.unflatten_dict(flat)}


@pytest.mark.parametrize('arch,kernel_num', PARITY)
def test_logits_match_the_official_forward(arch, kernel_num):
  net = official(arch, kernel_num)
  images = random_images(2)
  with torch.no_grad():
    expected = net(images).numpy()
  model, variables = convert.from_odconv(net.state_dict(), arch)
  assert model.num_experts == kernel_num
  ours = sum(x.size for x in jax.tree.leaves(variables['params']))
  assert ours == sum(p.numel() for p in net.parameters())
  apply = jax.jit(model.apply)
  error = relative_error(apply(variables, nhwc(images)), expected)
  assert error <= 1e-4, error
  # The comparison has teeth: the logits depend on the first layers (a
  # random deep network can forget them) far beyond the tolerance.
  flipped = relative_error(
      apply(with_first_3x3_flipped(variables), nhwc(images)), expected)
  assert flipped > 1e-3, flipped


def test_main_py_checkpoint_wrapper_and_module_prefix():
  state = odconv_torch.od_mobilenetv2_050(kernel_num=2).state_dict()
  wrapped = {'epoch': 150, 'best_acc': 70.0,
             'state_dict': {f'module.{k}': v for k, v in state.items()}}
  model, variables = convert.from_odconv(wrapped, 'od_mobilenetv2_050')
  _, plain = convert.from_odconv(state, 'od_mobilenetv2_050')
  assert model.num_experts == convert.odconv_num_experts(wrapped) == 2
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(a, b)


def test_errors_name_the_problem():
  state = odconv_torch.od_resnet18(kernel_num=2).state_dict()
  with pytest.raises(ValueError, match="'od_resnet34'.*od_resnet18"):
    convert.from_odconv(state, 'od_resnet34')
  # od_resnet18's weights given as od_resnet50: the bottleneck's conv3 is
  # missing, and layer1.0.conv1 is a 1x1 there, not a 3x3.
  with pytest.raises(ValueError) as error:
    convert.from_odconv(state, 'od_resnet50')
  message = str(error.value)
  assert 'od_resnet50' in message
  assert "look like od_resnet18's" in message
  assert 'layer1.0.conv3.weight' in message
  assert 'layer1.0.conv1.weight is (2, 64, 64, 3, 3), expected (2, 64, 64, ' \
         '1, 1)' in message
  missing = dict(state)
  del missing['layer3.1.conv2.attention.kernel_fc.bias']
  missing['extra.weight'] = torch.zeros(3)
  with pytest.raises(ValueError) as error:
    convert.from_odconv(missing, 'od_resnet18')
  assert 'layer3.1.conv2.attention.kernel_fc.bias' in str(error.value)
  assert 'extra.weight' in str(error.value)
  mixed = dict(state)
  mixed['layer4.1.conv2.weight'] = torch.zeros(4, 512, 512, 3, 3)
  with pytest.raises(ValueError, match=r'K=4 in layer4\.1\.conv2\.weight'):
    convert.from_odconv(mixed, 'od_resnet18')
  plain = {k: v for k, v in state.items() if v.ndim != 5}
  with pytest.raises(ValueError, match='no ODConv weight'):
    convert.from_odconv(plain, 'od_resnet18')


@pytest.mark.slow  # end-to-end: `pytest -m slow`
def test_cli_writes_what_eval_reads(tmp_path):
  arch = 'od_mobilenetv2_050'
  net = official(arch, 4, seed=3)
  images = random_images(4)
  with torch.no_grad():
    expected = net(images).numpy()
  path = tmp_path / 'od_mobilenetv2_050_4x.pth'
  torch.save({'epoch': 150, 'state_dict': {
      f'module.{k}': v.float() for k, v in net.state_dict().items()}}, path)
  convert.main(['--model', arch, '--weights', str(path),
                '--out', str(tmp_path / 'out')])
  config = config_schema.load_config(tmp_path / 'out')
  assert (config.model, config.num_experts) == (arch, 4)
  assert (config.normalization, config.image_size) == ('imagenet', 224)
  assert config.ema_decay == 0.0 and config.temperature_final == 1.0
  saved = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert saved['padding'] == 'symmetric' and saved['bn_epsilon'] == 1e-5
  # The model eval.py builds from the config (trainer.build_model's fields).
  model = get_model(config.model, num_experts=config.num_experts,
                    padding=config.padding, bn_epsilon=config.bn_epsilon)
  variables = convert.load_variables(tmp_path / 'out')
  error = relative_error(jax.jit(model.apply)(variables, nhwc(images)),
                         expected)
  assert error <= 1e-4, error
