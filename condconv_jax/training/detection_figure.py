"""A picture of a detector at work: evaluation images with their ground-truth
boxes (green) and the detections above a score (red, score written)."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from condconv_jax.training import routing_analysis


def first_images(trainer, variables, count: int, split: str | None = None):
  """The first `count` real images of an evaluation split with their ground
  truth and detections: a list of dicts of NumPy arrays ('image' uint8
  [H, W, 3], 'boxes' [D, 4], 'scores' [D], 'count', 'gt_boxes' [G, 4],
  'gt_mask' [G]; boxes normalized)."""
  found = []
  for batch in trainer.dataset.eval_batches(split or trainer.eval_split):
    outputs = jax.device_get(trainer.eval_step(variables,
                                               trainer.to_global(batch)))
    # Process-local images; outputs cover the global batch, this process's
    # rows first on process 0 (the only one that draws).
    for i in np.flatnonzero(batch['mask'])[:count - len(found)]:
      found.append({'image': batch['image'][i],
                    **{k: outputs[k][i] for k in ('boxes', 'scores', 'count',
                                                  'gt_boxes', 'gt_mask')}})
    # eval_step is collective: every process stops after the same batch,
    # the one where process 0 (which draws) has its images.
    done = np.asarray(len(found) == count)
    if jax.process_count() > 1:
      done = multihost_utils.broadcast_one_to_all(done)
    if done:
      break
  return found


def run_title(config) -> str:
  """What a run's pictures are of: model, experts, dataset and split."""
  return (f'{config.model}, {config.num_experts} experts, '
          f'{config.dataset} {config.eval_split}'.strip())


def write(trainer, variables, path, count: int = 4, min_score: float = 0.3,
          title: str = '', evaluator=None):
  """Draws the first `count` evaluation images to `path` on process 0.
  Every process calls it: the evaluation steps are collective."""
  examples = images_of(trainer, variables, evaluator, count)
  if jax.process_index() == 0:
    plot(examples, path, min_score, title)


def images_of(trainer, variables, evaluator, count: int):
  """The first `count` images of the evaluation split with their ground
  truth and detections. A dataset that detects on tiles of its images
  (`examples(split)`) gives them whole, with the stitched detections of
  `evaluator` (a `tasks.DetectionEvaluator` after result(); run here when
  None)."""
  if not hasattr(trainer.dataset, 'examples'):
    return first_images(trainer, variables, count)
  if evaluator is None:
    evaluator = trainer.evaluated(variables)
    evaluator.result()
  return stitched_images(trainer, evaluator, count)


def stitched_images(trainer, evaluator, count: int):
  """The first `count` images of the evaluated split, whole, with the
  evaluator's stitched detections (process 0; [] elsewhere)."""
  images = trainer.dataset.examples(trainer.eval_split or 'validation')
  found = []
  for image_id in sorted(evaluator.images)[:count]:
    ex = evaluator.images[image_id]
    found.append({'image': images[image_id][0], 'boxes': ex['boxes'],
                  'scores': ex['scores'], 'count': len(ex['scores']),
                  'gt_boxes': ex['gt_boxes'],
                  'gt_mask': ex['gt_mask'].astype(bool)})
  return found


def plot_pr(curves, path, title: str = ''):
  """Box precision against recall (deepforest's, IoU 0.4) over score
  thresholds; curves: {label: (curve, chosen threshold)}, the chosen
  threshold's point marked."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(4.6, 4.2))
  for label, (curve, threshold) in curves.items():
    line, = ax.plot(curve['recall'], curve['precision'], lw=1.2, label=label)
    at = int(np.argmin(np.abs(curve['threshold'] - threshold)))
    ax.plot(curve['recall'][at], curve['precision'][at], 'o',
            color=line.get_color(), ms=5)
    ax.annotate(f'{threshold:.2f}', (curve['recall'][at],
                                     curve['precision'][at]),
                fontsize=7, xytext=(4, 4), textcoords='offset points')
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel('box recall (IoU > 0.4)')
  ax.set_ylabel('box precision')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='lower left')
  ax.set_title(title or 'precision-recall over score thresholds (dot: '
               'the chosen one)', fontsize=8)
  fig.tight_layout()
  routing_analysis.save_figure(fig, path)
  plt.close(fig)


def plot(examples, path: str, min_score: float = 0.3, title: str = ''):
  """One row of images with their boxes (see `plot_rows`)."""
  plot_rows([('', examples, min_score)], path, title)


def plot_rows(rows, path: str, title: str = ''):
  """rows: [(row title, examples, min_score)], a row of images each, ground
  truth green, detections with score >= min_score red."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.patches as patches  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  columns = max(len(examples) for _, examples, _ in rows)
  fig, axes = plt.subplots(len(rows), columns, squeeze=False,
                           figsize=(4.2 * columns, 4.4 * len(rows) + 0.3))
  for row_axes, (row_title, examples, min_score) in zip(axes, rows):
    for ax in row_axes[len(examples):]:
      ax.axis('off')
    for ax, ex in zip(row_axes, examples):
      height, width = ex['image'].shape[:2]
      ax.imshow(ex['image'].squeeze())

      def draw(box, color, label=None, ax=ax, height=height, width=width):
        ymin, xmin, ymax, xmax = box * [height, width, height, width]
        ax.add_patch(patches.Rectangle((xmin, ymin), xmax - xmin,
                                       ymax - ymin, fill=False, color=color,
                                       linewidth=0.9))
        if label:
          ax.text(xmin, ymin, label, color=color, fontsize=5)

      for box in ex['gt_boxes'][ex['gt_mask']]:
        draw(box, 'lime')
      keep = [j for j in range(int(ex['count']))
              if ex['scores'][j] >= min_score]
      for j in keep:
        draw(ex['boxes'][j], 'red', f'{ex["scores"][j]:.2f}')
      ax.set_title(f'{row_title}{int(ex["gt_mask"].sum())} true (green), '
                   f'{len(keep)} detected >= {min_score:.2f} (red)',
                   fontsize=8)
      ax.axis('off')
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  routing_analysis.save_figure(fig, path)
  plt.close(fig)


