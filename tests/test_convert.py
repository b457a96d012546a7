"""timm -> Flax weight conversion: output parity with the peer implementation.

timm builds each model with random weights (no download); BatchNorm running
statistics are randomized so they are exercised; both run in eval mode on the
same random batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torchvision

import condconv_jax
from condconv_jax import convert

PARITY_MODELS = ['tf_efficientnet_cc_b0_4e', 'tf_efficientnet_cc_b0_8e',
                 'tf_efficientnet_cc_b1_8e', 'tf_efficientnet_b0',
                 'efficientnet_cc_b0_4e']
IMAGE_SIZE = 67  # odd: TF 'SAME' and symmetric padding differ on it


def timm_model(name):
  """A randomly initialized timm model with random BatchNorm statistics and
  affine parameters. The scales are drawn around 0.5, as in trained
  residual networks: at 1.0, 23 residual blocks of random weights amplify
  float32 rounding ~1000x (timm's own float32 and float64 outputs of B1 then
  differ by 2e-5), and the comparison would measure that, not the port."""
  torch.manual_seed(0)
  return randomize_batch_norm(timm.create_model(name, pretrained=False))


def randomize_batch_norm(model):
  """`model` in eval mode with random BatchNorm statistics and affine
  parameters (see timm_model)."""
  model.eval()
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        shape = module.running_mean.shape
        uniform = lambda: torch.rand(shape, generator=generator)
        module.running_mean.copy_(0.2 * uniform() - 0.1)
        module.running_var.copy_(0.5 + uniform())
        module.weight.copy_(0.4 + 0.2 * uniform())
        module.bias.copy_(0.2 * uniform() - 0.1)
  return model


def random_images(seed, batch=2):
  """Inputs in [-1, 1], the range the models see after normalization."""
  generator = torch.Generator().manual_seed(seed)
  return 2 * torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE,
                        generator=generator) - 1


@pytest.mark.parametrize('name', PARITY_MODELS)
def test_logits_match_timm(name):
  images = random_images(2)
  model = timm_model(name)
  with torch.no_grad():
    expected = model(images).numpy()
  variables = convert.from_timm(model.state_dict(), name)
  ours = convert.TIMM_MODELS[name].model()
  logits = ours.apply(variables, jnp.asarray(images.numpy().transpose(0, 2, 3,
                                                                      1)))
  error = np.max(np.abs(np.asarray(logits) - expected)) / np.max(
      np.abs(expected))
  assert error <= 1e-4, error


def test_routing_weights_of_a_condconv_block_match_timm():
  name = 'tf_efficientnet_cc_b0_4e'
  images = random_images(3)
  model = timm_model(name)
  captured = {}
  block = model.blocks[4][0]
  hook = block.routing_fn.register_forward_hook(
      lambda module, inputs, output: captured.setdefault(
          'routing', torch.sigmoid(output)))
  with torch.no_grad():
    model(images)
  hook.remove()
  variables = convert.from_timm(model.state_dict(), name)
  _, state = convert.TIMM_MODELS[name].model().apply(
      variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)),
      mutable=['intermediates'])
  (ours,) = state['intermediates']['blocks_4_0']['routing']['routing_weights']
  np.testing.assert_allclose(ours, captured['routing'].numpy(), rtol=1e-5,
                             atol=1e-6)


def test_specs_match_timm_pretrained_cfg():
  for name, spec in convert.TIMM_MODELS.items():
    cfg = timm.create_model(name, pretrained=False).pretrained_cfg
    assert cfg['input_size'][1] == spec.image_size, name
    mean = {'inception': (0.5, 0.5, 0.5),
            'imagenet': (0.485, 0.456, 0.406)}[spec.normalization]
    np.testing.assert_allclose(cfg['mean'], mean, err_msg=name)


def test_parameter_counts_match_timm():
  for name in ('tf_efficientnet_cc_b0_4e', 'tf_efficientnet_cc_b0_8e',
               'tf_efficientnet_cc_b1_8e'):
    model = timm.create_model(name, pretrained=False)
    variables = convert.from_timm(model.state_dict(), name)
    ours = sum(x.size for x in jax.tree.leaves(variables['params']))
    assert ours == sum(p.numel() for p in model.parameters())


def test_mismatched_state_dict_lists_the_problems():
  state = timm.create_model('tf_efficientnet_cc_b0_4e').state_dict()
  state['extra.weight'] = torch.zeros(3)
  del state['blocks.4.0.routing_fn.bias']
  with pytest.raises(ValueError) as error:
    convert.from_timm(state, 'tf_efficientnet_cc_b0_4e')
  assert "'extra.weight'" in str(error.value)
  assert 'params/blocks_4_0/routing/dense/bias' in str(error.value)
  with pytest.raises(ValueError, match='shape mismatches'):
    convert.from_timm(state_dict_with_wrong_shape(), 'tf_efficientnet_b0')
  with pytest.raises(ValueError, match='supported'):
    convert.from_timm({}, 'resnet18')


def state_dict_with_wrong_shape():
  state = timm.create_model('tf_efficientnet_b0', pretrained=False).state_dict()
  state['conv_head.weight'] = torch.zeros(1280, 321, 1, 1)
  return state


def test_cli_round_trip_through_safetensors(tmp_path):
  from safetensors.torch import save_file
  name = 'tf_efficientnet_cc_b0_4e'
  model = timm_model(name)
  path = tmp_path / 'weights.safetensors'
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            str(path))
  variables = convert.from_timm(convert.load_state_dict(str(path)), name)
  convert.save_variables(variables, str(tmp_path / 'out'),
                         convert.eval_config(name))
  restored = convert.load_variables(str(tmp_path / 'out'))
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  assert (tmp_path / 'out' / 'config.json').exists()


@pytest.mark.slow  # end-to-end: `pytest -m slow`
def test_timm_efficientnet_b0_upcycles_to_cc_b0_8_with_its_logits():
  # Pretrained static weights -> the CondConv twin, exact at step 0: timm's
  # efficientnet_b0 (random weights here) converted, then upcycled.
  name = 'efficientnet_b0'
  images = random_images(4)
  model = timm_model(name)
  with torch.no_grad():
    expected = model(images).numpy()
  spec = convert.TIMM_MODELS[name]
  static = convert.from_timm(model.state_dict(), name)
  twin = spec.model(num_experts=8)
  x = jnp.asarray(images.numpy().transpose(0, 2, 3, 1))
  variables = condconv_jax.upcycle(static, twin, input_shape=x.shape)
  logits = jax.jit(twin.apply)(variables, x)
  error = np.max(np.abs(np.asarray(logits) - expected)) / np.max(
      np.abs(expected))
  assert error <= 1e-4, error
  assert twin.num_experts == 8 and spec.num_experts == 0


def test_torchvision_resnet50_converts_and_upcycles_to_cc_resnet50_8():
  # torchvision's ResNet-50 (timm's has the same state_dict names), random
  # weights and statistics; then its CondConv twin, exact at step 0.
  torch.manual_seed(0)
  model = randomize_batch_norm(torchvision.models.resnet50(weights=None))
  images = random_images(5)
  with torch.no_grad():
    expected = model(images).numpy()
  static = convert.from_timm(model.state_dict(), 'resnet50')
  spec = convert.TIMM_MODELS['resnet50']
  x = jnp.asarray(images.numpy().transpose(0, 2, 3, 1))
  for twin, variables in (
      (spec.model(), static),
      (spec.model(num_experts=8), None)):
    if variables is None:
      variables = condconv_jax.upcycle(static, twin, input_shape=x.shape)
    logits = jax.jit(twin.apply)(variables, x)
    error = np.max(np.abs(np.asarray(logits) - expected)) / np.max(
        np.abs(expected))
    assert error <= 1e-4, (twin.num_experts, error)
