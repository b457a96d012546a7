"""Initialization: the official TF rule (normal, std sqrt(2 / fan_out)) with
the depthwise fan-out counted as the TF/Keras code counts it, kh * kw *
channel_multiplier, for static depthwise kernels and CondConv depthwise
experts; checked against the formula (whole models) and against timm's
initializer on the same layers."""

import math

import jax
import numpy as np
import pytest
from flax import traverse_util

from condconv_jax.models import get_model
from condconv_jax.models.blocks import ConvFactory
from condconv_jax.models.mbconv import MBConvNet, Stage


def tf_std(kh, kw, multiplier=1):
  """efficientnet_model.conv_kernel_initializer on the Keras depthwise
  kernel shape (kh, kw, C, multiplier): fan_out = kh * kw * multiplier."""
  return math.sqrt(2.0 / (kh * kw * multiplier))


@pytest.mark.parametrize('model', [
    # An EfficientNet-like net: a static 3x3 and a CondConv 5x5 stage.
    MBConvNet(stages=(Stage(3, 1, 1, 16, 1, 0.25), Stage(5, 2, 6, 24, 2, 0.25)),
              condconv_stages=(2,), num_experts=4, num_classes=10),
    get_model('mobilenet_v1_mini', num_experts=8),  # static 1-3, CC 4-6
], ids=['mbconv', 'mobilenet_v1'])
def test_every_depthwise_kernel_of_a_model_follows_the_tf_formula(model):
  params = model.init(jax.random.key(0),
                      np.zeros((1, 16, 16, 3), np.float32))['params']
  static = experts = 0
  for path, kernel in traverse_util.flatten_dict(params).items():
    if path[-1] != 'kernel' or kernel.ndim < 4 or kernel.shape[-2] != 1 or (
        kernel.shape[-1] == 1):
      continue  # not a depthwise kernel ([kh, kw, 1, C] or [E, kh, kw, 1, C])
    kernel = np.asarray(kernel)
    kh, kw = kernel.shape[-4:-2]
    per_expert = kernel if kernel.ndim == 5 else kernel[None]
    static += kernel.ndim == 4
    experts += kernel.ndim == 5
    for expert in per_expert:  # each expert on its own shape
      # The std of n >= 72 normal samples: relative error ~ 1 / sqrt(2n).
      assert np.std(expert) == pytest.approx(tf_std(kh, kw), rel=0.3), path
  assert static > 0 and experts > 0


@pytest.mark.parametrize('kernel,channels,out,experts', [
    (3, 32, None, 0), (5, 240, None, 0),  # static depthwise
    (3, 480, None, 4), (5, 672, None, 4),  # CondConv depthwise experts
    (1, 80, 480, 4), (1, 112, 672, 0),  # pointwise, for contrast
])
def test_init_matches_timms_on_the_same_layer(kernel, channels, out, experts):
  """timm's _init_weight_goog (the TF rule: fan_out = kh * kw * out //
  groups) on nn.Conv2d / CondConv2d of the same shape."""
  torch = pytest.importorskip('torch')
  timm_layers = pytest.importorskip('timm.layers')
  from timm.models import _efficientnet_builder  # pylint: disable=g-import-not-at-top
  depthwise = out is None
  out = channels if depthwise else out
  groups = channels if depthwise else 1
  torch.manual_seed(0)
  if experts:
    theirs = timm_layers.CondConv2d(channels, out, kernel, groups=groups,
                                    num_experts=experts)
  else:
    theirs = torch.nn.Conv2d(channels, out, kernel, groups=groups,
                             bias=False)
  _efficientnet_builder._init_weight_goog(theirs)  # pylint: disable=protected-access
  theirs = theirs.weight.detach().numpy()
  conv = ConvFactory(num_experts=experts)(out, kernel, groups=groups,
                                          conditional=bool(experts), name='c')
  x = np.zeros((1, 8, 8, channels), np.float32)
  variables = conv.init(jax.random.key(0), x)
  ours = np.asarray(variables['params']['kernel'])
  assert ours.size == theirs.size
  # The sample std of n normals has a relative spread of 1 / sqrt(2n); the
  # bound is 4 of those for each side of the comparison (n >= 288).
  bound = 4 * math.sqrt(2) / math.sqrt(2 * ours.size)
  assert np.std(ours) == pytest.approx(float(np.std(theirs)), rel=bound)
  want = tf_std(kernel, kernel) if depthwise else math.sqrt(
      2.0 / (kernel * kernel * out))
  assert np.std(ours) == pytest.approx(want, rel=bound)
