"""Detecting on an image larger than the model's input: overlapping tiles at
native scale, stitched back together (NumPy, on the host).

An image of `size` pixels is covered by tiles of `tile` pixels that overlap
by at least `min_overlap` (`tile_layout`). Each tile owns a core: the part
of the image nearer its centre than any other tile's, cut at the middle of
each overlap. A detection is kept only by the tile whose core holds its
centre (`stitch`), so an object no larger than the overlap is seen whole by
the tile that keeps it, and no two tiles keep the same object twice: no
cross-tile NMS, and no boxes truncated at an inner tile border.
"""

from __future__ import annotations

import math

import numpy as np


def tile_starts(size: int, tile: int, min_overlap: int) -> np.ndarray:
  """First pixels of the fewest tiles of `tile` pixels that cover `size`
  pixels with neighbours overlapping by at least `min_overlap`, evenly
  spaced (one tile at 0 when tile >= size)."""
  if tile >= size:
    return np.zeros(1, int)
  if not 0 <= min_overlap < tile:
    raise ValueError(f'min_overlap must be in [0, tile = {tile}); got '
                     f'{min_overlap}.')
  count = 1 + math.ceil((size - tile) / (tile - min_overlap))
  return np.round(np.linspace(0, size - tile, count)).astype(int)


def tile_layout(size: int, tile: int, min_overlap: int):
  """The tiles of a size x size image: (windows [K, 4], cores [K, 4]), both
  normalized [ymin, xmin, ymax, xmax] in the image, row-major. The cores
  partition the image (half-open, the last ones closed at 1)."""
  starts = tile_starts(size, tile, min_overlap)
  ends = starts + min(tile, size)
  cuts = np.concatenate([[0.0], (starts[1:] + ends[:-1]) / 2, [size]]) / size
  cuts[-1] = np.inf  # a centre exactly on the far border belongs to the last
  windows, cores = [], []
  for i in range(len(starts)):
    for j in range(len(starts)):
      windows.append([starts[i], starts[j], ends[i], ends[j]])
      cores.append([cuts[i], cuts[j], cuts[i + 1], cuts[j + 1]])
  return (np.array(windows, np.float64) / size, np.array(cores, np.float64))


def to_image(boxes, window):
  """Boxes [..., 4] normalized in a tile -> normalized in the image, for
  the tile's window [4] (normalized in the image)."""
  boxes = np.asarray(boxes, np.float64)
  window = np.asarray(window, np.float64)
  offset = np.tile(window[:2], 2)
  scale = np.tile(window[2:] - window[:2], 2)
  return offset + boxes * scale


def in_core(boxes, core) -> np.ndarray:
  """Whether each box's centre [...] lies in the core [4] (half-open)."""
  boxes = np.asarray(boxes, np.float64)
  cy = (boxes[..., 0] + boxes[..., 2]) / 2
  cx = (boxes[..., 1] + boxes[..., 3]) / 2
  return ((cy >= core[0]) & (cy < core[2]) & (cx >= core[1]) &
          (cx < core[3]))


def stitch(tiles):
  """One image's detections from its tiles' detections.

  tiles: [(boxes [D, 4] normalized in the tile, scores [D], classes [D],
  window [4], core [4])], each tile's valid detections. Returns (boxes
  [N, 4] normalized in the image, scores [N], classes [N]) in decreasing
  score order: the detections whose centre lies in their tile's core.
  """
  boxes, scores, classes = [], [], []
  for tile_boxes, tile_scores, tile_classes, window, core in tiles:
    mapped = to_image(tile_boxes, window)
    keep = in_core(mapped, core)
    boxes.append(mapped[keep])
    scores.append(np.asarray(tile_scores)[keep])
    classes.append(np.asarray(tile_classes)[keep])
  boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4))
  scores = np.concatenate(scores) if scores else np.zeros(0)
  classes = np.concatenate(classes) if classes else np.zeros(0, int)
  order = np.argsort(-scores, kind='stable')
  return boxes[order], scores[order], classes[order]
