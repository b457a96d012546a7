"""Every experiment config loads, names a real model, and documents itself."""

import glob
import importlib
import os

import pytest

from condconv_jax.training import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.relpath(p, ROOT)[:-3].replace(os.sep, '.')
    for p in glob.glob(os.path.join(ROOT, 'configs', '**', '*.py'),
                       recursive=True)
    if not p.endswith(('__init__.py', 'base.py', 'common.py')))


def test_every_paper_experiment_has_a_config():
  names = {c.split('.')[-1] for c in CONFIGS}
  expected = {'mobilenet_v1', 'mobilenet_v1_cc8', 'mobilenet_v1_050',
              'mobilenet_v1_050_cc8', 'mobilenet_v1_025',
              'mobilenet_v1_025_cc8', 'mobilenet_v2', 'mobilenet_v2_cc8',
              'mnasnet_a1', 'mnasnet_a1_cc8', 'resnet50', 'resnet50_cc8',
              'efficientnet_b0', 'efficientnet_b0_cc4', 'efficientnet_b0_cc8',
              'fashion_mnist'}
  assert expected <= names


@pytest.mark.parametrize('module_name', CONFIGS)
def test_config_loads_and_builds_its_model(module_name):
  module = importlib.import_module(module_name)
  doc = module.__doc__
  assert 'python train.py --config configs/' in doc
  assert 'top-1' in doc or 'accuracy' in doc
  config = module.get_config()
  model = trainer.build_model(config, num_classes=10)
  assert model is not None
  with pytest.raises(AttributeError):
    config.not_a_field = 1
