"""Anchors against a loop transcription of TF's create_ssd_anchors."""

import numpy as np
import pytest

from condconv_jax.detection import (anchor_box_specs, feature_map_sizes,
                                    num_anchors_per_location, ssd_anchors)
from tests import test_detection_reference as ref

SSD300_SIZES = [(19, 19), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]


def test_ssd300_has_1917_anchors_on_tf_feature_maps():
  # ssd_mobilenet_v1_feature_extractor: 19, 10 then 5, 3, 2, 1 at 300x300.
  assert feature_map_sizes(300) == tuple(SSD300_SIZES)
  assert num_anchors_per_location() == (3, 6, 6, 6, 6, 6)
  anchors = ssd_anchors(300)
  assert anchors.shape == (1917, 4) and anchors.dtype == np.float32
  assert 3 * 19 * 19 + 6 * (100 + 25 + 9 + 4 + 1) == 1917


def test_first_anchor_by_hand():
  # Layer 0, cell (0, 0), box (scale 0.1, aspect 1): center 0.5 / 19.
  c = 0.5 / 19
  np.testing.assert_allclose(ssd_anchors(300)[0],
                             [c - 0.05, c - 0.05, c + 0.05, c + 0.05],
                             rtol=1e-6)
  # The last anchor: 1x1 layer, interpolated box sqrt(0.95 * 1.0), centered.
  s = np.sqrt(0.95) / 2
  np.testing.assert_allclose(ssd_anchors(300)[-1],
                             [0.5 - s, 0.5 - s, 0.5 + s, 0.5 + s], rtol=1e-6)


@pytest.mark.parametrize('image_size', [300, 320, 512, 64, (300, 500),
                                        (480, 360), 33])
def test_anchors_match_the_tf_formula(image_size):
  hw = (image_size, image_size) if isinstance(image_size, int) else image_size
  sizes = feature_map_sizes(image_size)
  # Strides 16 .. 512 of 'SAME' convs: ceil(size / stride).
  assert sizes == tuple((-(-hw[0] // s), -(-hw[1] // s))
                        for s in (16, 32, 64, 128, 256, 512))
  ours = ssd_anchors(image_size)
  expected = ref.tf_anchors(hw, sizes)
  assert ours.shape == expected.shape
  np.testing.assert_allclose(ours, expected, atol=2e-7)
  # First and last anchor of each layer, explicitly.
  start = 0
  for (gh, gw), n in zip(sizes, num_anchors_per_location()):
    end = start + gh * gw * n
    np.testing.assert_allclose(ours[[start, end - 1]],
                               expected[[start, end - 1]], atol=2e-7)
    start = end


def test_non_square_anchors_stay_square_in_pixels():
  anchors = ssd_anchors((300, 600))
  # The aspect-1 box of layer 0 is 0.1 of the short side: 30 px both ways.
  h = (anchors[0, 2] - anchors[0, 0]) * 300
  w = (anchors[0, 3] - anchors[0, 1]) * 600
  np.testing.assert_allclose([h, w], [30, 30], rtol=1e-5)


@pytest.mark.parametrize('kwargs', [
    dict(min_scale=0.05, max_scale=0.4),  # small objects (tree crowns)
    dict(scales=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7)),
    dict(aspect_ratios=(1.0, 2.0, 0.5), interpolated_scale_aspect_ratio=0.0),
    dict(reduce_boxes_in_lowest_layer=False),
])
def test_other_anchor_settings_match_the_tf_formula(kwargs):
  sizes = feature_map_sizes(256)
  ours = ssd_anchors(256, sizes, **kwargs)
  expected = ref.tf_anchors((256, 256), sizes, **kwargs)
  np.testing.assert_allclose(ours, expected, atol=2e-7)


def test_custom_feature_maps():
  sizes = [(8, 8), (4, 4), (2, 2)]
  np.testing.assert_allclose(ssd_anchors(128, sizes),
                             ref.tf_anchors((128, 128), sizes), atol=2e-7)


@pytest.mark.parametrize('call,match', [
    (lambda: ssd_anchors(0), 'image_size'),
    (lambda: ssd_anchors((300, 300, 3)), 'image_size'),
    (lambda: ssd_anchors(300, [(19, 19), (0, 10)]), 'positive'),
    (lambda: ssd_anchors(300, scales=(0.1, 0.2)), 'one scale per'),
    (lambda: ssd_anchors(300, min_scale=0.9, max_scale=0.2), 'min_scale'),
    (lambda: ssd_anchors(300, aspect_ratios=(1.0, -2.0)), 'aspect_ratios'),
    (lambda: anchor_box_specs(num_layers=1), 'num_layers'),
])
def test_bad_anchor_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()
