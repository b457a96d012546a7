"""A detector's report: COCO metrics and deepforest's box precision and
recall on an evaluation split, at a score threshold chosen on the
validation split (never on the split reported), with its pictures.
"""

from __future__ import annotations

import jax
import numpy as np

from condconv_jax.detection import box_match
from condconv_jax.training import detection_figure, tasks

THRESHOLD_SPLIT = 'validation'


def is_detector(trainer) -> bool:
  return isinstance(trainer.task, tasks.Detection)


def evaluate(trainer, variables, split: str | None = None,
             score_threshold: float | None = None):
  """(metrics, evaluator) of `split` (default: the run's evaluation split).

  The score threshold for box precision and recall is score_threshold,
  else config.score_threshold, else the best-F1 threshold of the
  validation split, which is then evaluated first; its COCO AP and AP50
  are added as 'validation_AP' and 'validation_AP50'.
  """
  split = split or trainer.eval_split or THRESHOLD_SPLIT
  threshold = (score_threshold if score_threshold is not None else
               trainer.config.score_threshold)
  chosen = {}
  if threshold is None and split == THRESHOLD_SPLIT:
    trainer.task.score_threshold = None  # its own best-F1 threshold
    evaluator = trainer.evaluated(variables, split)
    return evaluator.result(), evaluator
  if threshold is None:
    trainer.task.score_threshold = None
    validation = trainer.evaluate(variables, THRESHOLD_SPLIT)
    threshold = validation['best_f1_threshold']
    chosen = {f'validation_{k}': validation[k]
              for k in ('AP', 'AP50', 'box_precision', 'box_recall')}
  trainer.task.score_threshold = threshold
  evaluator = trainer.evaluated(variables, split)
  return {**evaluator.result(), **chosen}, evaluator


def write_pictures(trainer, variables, evaluator, metrics, run_dir,
                   title: str):
  """run_dir/detections.png (the evaluated images, detections over the
  score threshold) and run_dir/pr.png (box precision-recall curve)."""
  detections = run_dir / 'detections.png'
  pr = run_dir / 'pr.png'
  detection_figure.write(trainer, variables, detections,
                         min_score=metrics['score_threshold'], title=title,
                         evaluator=evaluator)
  if jax.process_index() == 0:
    detection_figure.plot_pr({title: (evaluator.curve,
                                       metrics['score_threshold'])}, pr)
  return {'detections_png': str(detections), 'pr_png': str(pr)}


def per_image(evaluator, score_threshold: float) -> dict:
  """{image_id: {'box_precision', 'box_recall', 'objects', 'detections'}} at the
  score threshold, from an evaluator after result() (process 0)."""
  found = {}
  for image_id, image in sorted(evaluator.images.items()):
    gt, boxes, scores = tasks.in_pixels(image)
    precision, recall = box_match.precision_recall([(gt, boxes, scores)],
                                                   score_threshold)
    found[image_id] = {
        'box_precision': precision, 'box_recall': recall,
        'objects': len(gt),
        'detections': int(np.sum(scores >= score_threshold))}
  return found
