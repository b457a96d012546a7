"""Cost counting against hand-computed numbers for small known layers."""

import flax.linen as nn
import pytest

from condconv_jax import CondConv
from condconv_jax.models import cost
from condconv_jax.models.blocks import SqueezeExcite, ConvFactory


class Tiny(nn.Module):
  experts: int

  @nn.compact
  def __call__(self, x, *, train=False):
    x = nn.Conv(16, (3, 3), strides=2, name='stem')(x)  # 10x10 -> 5x5
    x = CondConv(24, (3, 3), feature_group_count=2, num_experts=self.experts,
                 name='cond')(x)
    x = SqueezeExcite(4, ConvFactory(), 'relu', name='se')(x)
    return nn.Dense(7, name='fc')(x.mean(axis=(1, 2)))


def test_counts_match_hand_computation():
  c = cost.count(Tiny(experts=4), (1, 10, 10, 3))
  stem = 5 * 5 * 16 * (3 * 3 * 3)
  kernel = 3 * 3 * (16 // 2) * 24
  cond = 5 * 5 * 24 * (3 * 3 * 8) + 4 * kernel
  routing = 5 * 5 * 16 + 16 * 4  # pool + dense
  se = 2 * 5 * 5 * 24 + 24 * 4 + 4 * 24  # pool + gate + two 1x1 convs
  fc = 24 * 7
  assert c.macs == stem + cond + routing + se + fc
  params = ((3 * 3 * 3 * 16 + 16) + (4 * kernel + 4 * 24) + (16 * 4 + 4) +
            (24 * 4 + 4) + (4 * 24 + 24) + (24 * 7 + 7))
  assert c.params == params
  by_path = {layer.path: layer for layer in c.layers}
  assert by_path['cond'].params == 4 * kernel + 4 * 24
  assert by_path['cond/routing/dense'].macs == 16 * 4
  assert by_path['stem'].output_shape == (1, 5, 5, 16)
  assert 'total' in c.table()


def test_count_needs_batch_one():
  with pytest.raises(ValueError, match='batch 1'):
    cost.count(Tiny(experts=2), (2, 10, 10, 3))
