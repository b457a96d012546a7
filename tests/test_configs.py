"""Every experiment config: documented, locked, the paper's recipe
(docs/paper.md, transcribed here by hand), and a model that builds."""

import glob
import importlib
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from condconv_jax.training import optim, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.relpath(p, ROOT)[:-3].replace(os.sep, '.')
    for p in glob.glob(os.path.join(ROOT, 'configs', '**', '*.py'),
                       recursive=True)
    if not p.endswith(('__init__.py', 'base.py', 'common.py')))

# docs/paper.md, "Training recipes": the official EfficientNet-CondConv recipe [V].
TF_TPU_RECIPE = dict(
    optimizer='rmsprop', rmsprop_decay=0.9, momentum=0.9, rmsprop_epsilon=1e-3,
    learning_rate=0.016, batch_size=2048, warmup_epochs=5.0,
    lr_schedule='exponential', lr_decay_rate=0.97, lr_decay_epochs=2.4,
    num_epochs=350.0, dtype='bfloat16', weight_decay=1e-5,
    weight_decay_params='all_but_batchnorm', label_smoothing=0.1,
    ema_decay=0.9999)
EFFICIENTNET = dict(TF_TPU_RECIPE, drop_path_rate=0.2, bn_momentum=0.99,
                    bn_epsilon=1e-3, activation='swish')  # survival 0.8
# The standard ResNet-50 recipe (docs/paper.md: "each model's standard recipe").
RESNET = dict(optimizer='sgd', nesterov=True, momentum=0.9, learning_rate=0.1,
              batch_size=1024, lr_schedule='cosine', warmup_epochs=5.0,
              num_epochs=90.0, weight_decay=1e-4, weight_decay_params='kernels',
              label_smoothing=0.1, ema_decay=0.0)
MOBILENET = dict(TF_TPU_RECIPE, weight_decay=4e-5)
# docs/paper.md, "The dynamic-convolution family": the official ODConv
# commands and main.py (batch 256 over 8 GPUs, PyTorch SGD with
# weight_decay on every parameter, no warm-up, smoothing or EMA), and its
# get_temperature: 30 -> 1 linearly over the first 10 epochs.
OD_COMMON = dict(optimizer='sgd', nesterov=False, momentum=0.9,
                 batch_size=256, warmup_epochs=0.0, weight_decay_params='all',
                 label_smoothing=0.0, ema_decay=0.0, temperature_initial=30.0,
                 temperature_final=1.0, temperature_epochs=10.0)
OD_RESNET = dict(OD_COMMON, num_epochs=100.0, learning_rate=0.1,
                 lr_schedule='step', lr_decay_rate=0.1,
                 lr_milestone_epochs=(30, 60, 90), weight_decay=1e-4)
OD_MOBILENET = dict(OD_COMMON, num_epochs=150.0, learning_rate=0.05,
                    lr_schedule='cosine', weight_decay=4e-5)

EXPECTED = {
    'efficientnet_b0': ('efficientnet_b0', 0, 1.0,
                        dict(EFFICIENTNET, dropout_rate=0.2)),
    'efficientnet_b0_cc4': ('efficientnet_b0', 4, 1.0,
                            dict(EFFICIENTNET, dropout_rate=0.25)),
    'efficientnet_b0_cc8': ('efficientnet_b0', 8, 1.0,
                            dict(EFFICIENTNET, dropout_rate=0.25)),
    'mobilenet_v1': ('mobilenet_v1', 0, 1.0, dict(MOBILENET, bn_momentum=0.9)),
    'mobilenet_v1_cc8': ('mobilenet_v1', 8, 1.0,
                         dict(MOBILENET, bn_momentum=0.9)),
    'mobilenet_v1_050': ('mobilenet_v1', 0, 0.5,
                         dict(MOBILENET, bn_momentum=0.9)),
    'mobilenet_v1_050_cc8': ('mobilenet_v1', 8, 0.5,
                             dict(MOBILENET, bn_momentum=0.9)),
    'mobilenet_v1_025': ('mobilenet_v1', 0, 0.25,
                         dict(MOBILENET, bn_momentum=0.9)),
    'mobilenet_v1_025_cc8': ('mobilenet_v1', 8, 0.25,
                             dict(MOBILENET, bn_momentum=0.9)),
    'mobilenet_v2': ('mobilenet_v2', 0, 1.0, MOBILENET),
    'mobilenet_v2_cc8': ('mobilenet_v2', 8, 1.0, MOBILENET),
    'mnasnet_a1': ('mnasnet_a1', 0, 1.0, dict(TF_TPU_RECIPE,
                                              bn_momentum=0.99)),
    'mnasnet_a1_cc8': ('mnasnet_a1', 8, 1.0, dict(TF_TPU_RECIPE,
                                                  bn_momentum=0.99)),
    'resnet50': ('resnet50', 0, 1.0, RESNET),
    'resnet50_cc8': ('resnet50', 8, 1.0, RESNET),
    **{name: (model, experts, 1.0, recipe) for name, (model, experts, recipe)
       in {
           'od_resnet18_4x': ('od_resnet18', 4,
                              dict(OD_RESNET, dropout_rate=0.2)),
           'od_resnet50': ('od_resnet50', 1, dict(OD_RESNET,
                                                  dropout_rate=0.1)),
           'od_resnet50_4x': ('od_resnet50', 4, dict(OD_RESNET,
                                                     dropout_rate=0.1)),
           'od_mobilenetv2_100': ('od_mobilenetv2_100', 1,
                                  dict(OD_MOBILENET, dropout_rate=0.2)),
           'od_mobilenetv2_100_4x': ('od_mobilenetv2_100', 4,
                                     dict(OD_MOBILENET, dropout_rate=0.2)),
           'dy_mobilenetv2_100': ('dy_mobilenetv2_100', 4,
                                  dict(OD_MOBILENET, num_epochs=300.0,
                                       dropout_rate=0.2)),
           'dy_resnet18': ('dy_resnet18', 4, dict(OD_RESNET,
                                                  dropout_rate=0.1)),
       }.items()},
}
# Parameter counts with 1000 classes (tests/test_models.py's pins).
PARAMS = {('efficientnet_b0', 0, 1.0): 5_288_548,
          ('efficientnet_b0', 4, 1.0): 13_314_116,
          ('efficientnet_b0', 8, 1.0): 24_013_284,
          ('mobilenet_v1', 0, 1.0): 4_231_976,
          ('mobilenet_v1', 8, 1.0): 31_923_960,
          ('mobilenet_v1', 0, 0.5): 1_331_592,
          ('mobilenet_v1', 0, 0.25): 470_072,
          ('mobilenet_v2', 0, 1.0): 3_504_872,
          ('mobilenet_v2', 8, 1.0): 27_559_320,
          ('mnasnet_a1', 0, 1.0): 3_887_038,
          ('mnasnet_a1', 8, 1.0): 16_167_030,
          ('resnet50', 0, 1.0): 25_557_032,
          ('resnet50', 8, 1.0): 130_226_296,
          # ODConv's README (11.94M, 44.90M, 28.64M, 90.67M, 4.94M, 11.51M).
          ('od_resnet18', 4, 1.0): 44_901_640,
          ('od_resnet50', 1, 1.0): 28_635_112,
          ('od_resnet50', 4, 1.0): 90_670_888,
          ('od_mobilenetv2_100', 1, 1.0): 4_940_185,
          ('od_mobilenetv2_100', 4, 1.0): 11_512_149}


def test_every_paper_experiment_has_a_config():
  names = {c.split('.')[-1] for c in CONFIGS}
  assert set(EXPECTED) | {'fashion_mnist'} <= names


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_imagenet_config_is_the_papers_recipe(name):
  module = importlib.import_module(f'configs.imagenet.{name}')
  assert f'python train.py --config configs/imagenet/{name}.py' in (
      module.__doc__)
  assert 'Paper top-1' in module.__doc__
  config = module.get_config()
  model, experts, width, values = EXPECTED[name]
  assert (config.model, config.num_experts, config.width) == (model, experts,
                                                              width)
  assert config.dataset == 'imagenet2012' and config.image_size == 224
  for key, value in values.items():
    got = config[key]
    got = tuple(got) if isinstance(got, (list, tuple)) else got
    assert got == value, (key, got, value)
  with pytest.raises(AttributeError):
    config.not_a_field = 1
  # The model the config builds, initialized (abstractly) at 224x224.
  variables = jax.eval_shape(
      trainer.build_model(config, num_classes=1000).init, jax.random.key(0),
      np.zeros((1, 224, 224, 3), np.float32))
  params = traverse_util.flatten_dict(variables['params'])
  count = sum(v.size for v in params.values())
  if (model, experts, width) in PARAMS:
    assert count == PARAMS[model, experts, width]
  expert_kernels = [v.shape[0] for k, v in params.items()
                    if k[-1] == 'kernel' and v.ndim == 5]
  assert expert_kernels == [experts] * len(expert_kernels)
  assert bool(expert_kernels) == (experts > 0)


@pytest.mark.parametrize('name,family,experts', [
    ('fashion_mnist_dyconv', 'dyconv', (4,)),
    ('fashion_mnist_odconv', 'odconv', (1, 4))])
def test_fashion_mnist_dynamic_configs(name, family, experts):
  module = importlib.import_module(f'configs.{name}')
  assert f'python train.py --config configs/{name}.py' in module.__doc__
  config = module.get_config()
  assert config.conv_family == family
  assert tuple(config.compare_num_experts) == experts
  # 30 -> 1 over the first 10% of the 5 epochs, as the papers' 10 epochs.
  assert (config.temperature_initial, config.temperature_final,
          config.temperature_epochs, config.num_epochs) == (30.0, 1.0, 0.5,
                                                            5.0)


def test_fashion_mnist_config():
  module = importlib.import_module('configs.fashion_mnist')
  assert 'python train.py --config configs/fashion_mnist.py' in module.__doc__
  config = module.get_config()
  assert tuple(config.compare_num_experts) == (0, 8)
  assert (config.dataset, config.image_size, config.augment) == (
      'fashion_mnist', 28, 'shift_flip')
  trainer.build_model(config, num_classes=10)


# docs/paper.md, "COCO detector": ssd_mobilenet_v1_coco.config and the TPU
# ssd_mobilenet_v1_300x300_coco14_sync.config, in TF's own units (steps at
# a fixed batch, unscaled learning rates).
COCO_TRAIN_IMAGES = 118_287  # TFDS coco/2017 train
COCO = {
    'ssd_mobilenet_v1': (0, 20.3, 'tf'),
    'ssd_mobilenet_v1_cc8': (8, 22.4, 'tf'),
    'ssd_mobilenet_v1_sync': (0, 20.3, 'sync'),
    'ssd_mobilenet_v1_cc8_sync': (8, 22.4, 'sync'),
}
COCO_RECIPES = {
    'tf': dict(batch_size=24, steps=200_000, optimizer='rmsprop',
               momentum=0.9, rmsprop_decay=0.9, rmsprop_epsilon=1.0,
               weight_decay=4e-5, weight_decay_params='kernels',
               detection_loss='tf_coco', ema_decay=0.0,
               lr={0: 0.004, 199_999: 0.004}),  # x0.95 at 800,720: never
    'sync': dict(batch_size=1024, steps=20_000, optimizer='sgd',
                 momentum=0.9, weight_decay=4e-5, weight_decay_params='kernels',
                 detection_loss='tf_tpu_focal', ema_decay=0.0,
                 bn_momentum=0.97,
                 lr={0: 0.3, 500: 0.6, 1_000: 0.9, 10_500: 0.45, 20_000: 0.0}),
}


@pytest.mark.parametrize('name', sorted(COCO))
def test_coco_config_is_the_tf_recipe(name):
  module = importlib.import_module(f'configs.coco.{name}')
  experts, paper_map, recipe = COCO[name]
  assert f'python train.py --config configs/coco/{name}.py' in module.__doc__
  assert f'{paper_map}' in module.__doc__ and 'val2017' in module.__doc__
  config = module.get_config()
  assert (config.model, config.num_experts, config.dataset,
          config.image_size, config.augment) == (
              'ssd_mobilenet_v1', experts, 'coco', 300, 'ssd')
  want = dict(COCO_RECIPES[recipe])
  steps, lr = want.pop('steps'), want.pop('lr')
  for key, value in want.items():
    got = config[key]
    got = tuple(got) if isinstance(got, (list, tuple)) else got
    assert got == value, (key, got, value)
  assert trainer.train_steps(config, COCO_TRAIN_IMAGES) == steps
  schedule = optim.learning_rate_schedule(
      config, COCO_TRAIN_IMAGES / config.batch_size, steps)
  for step, value in lr.items():
    assert float(schedule(step)) == pytest.approx(value, abs=1e-6), step
  if recipe == 'sync':
    assert config.model_kwargs.class_bias_init == -4.6
    assert config.model_kwargs.predictor_init_stddev == 0.01
