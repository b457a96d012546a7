"""Parameter counts against the peer implementations' own models."""

import pytest
import timm
import torchvision

from condconv_jax.models import cost
from condconv_jax.models import get_model

PEERS = [
    ('mnasnet_a1', {}, lambda: timm.create_model('semnasnet_100')),
    ('efficientnet_b0', {}, lambda: timm.create_model('efficientnet_b0')),
    ('efficientnet_b0', dict(num_experts=4),
     lambda: timm.create_model('tf_efficientnet_cc_b0_4e')),
    ('mobilenet_v2', {}, torchvision.models.mobilenet_v2),
    ('mobilenet_v2', dict(width=0.5),
     lambda: torchvision.models.mobilenet_v2(width_mult=0.5)),
    *[(f'resnet{n}', {}, getattr(torchvision.models, f'resnet{n}'))
      for n in (18, 34, 50, 101, 152)],
]


@pytest.mark.parametrize('name,kwargs,peer', PEERS,
                         ids=[f'{p[0]}{p[1] or ""}' for p in PEERS])
def test_parameter_count_equals_the_peer(name, kwargs, peer):
  ours = cost.count(get_model(name, **kwargs), (1, 224, 224, 3)).params
  assert ours == sum(p.numel() for p in peer().parameters())
