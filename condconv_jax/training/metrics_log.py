"""Where metrics go: TensorBoard event files, a JSON-lines log, the console."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
import tqdm
from tensorboardX import SummaryWriter


class MetricsLog:
  """Writes on process 0 only; other processes keep quiet."""

  def __init__(self, workdir: str, total_steps: int, start_step: int,
               images_per_step: int):
    self.active = jax.process_index() == 0
    self.images_per_step = images_per_step
    if not self.active:
      return
    self.tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self.progress = tqdm.tqdm(total=total_steps, initial=start_step,
                              unit='step', dynamic_ncols=True,
                              mininterval=1.0)
    self._last_time, self._last_step = time.perf_counter(), start_step

  def write(self, step: int, split: str, metrics: dict):
    if not self.active:
      return
    metrics = {k: float(np.asarray(v)) for k, v in metrics.items()}
    for name, value in metrics.items():
      self.tensorboard.add_scalar(f'{split}/{name}', value, step)
    self.jsonl.write(json.dumps({'step': step, 'split': split, **metrics}) +
                     '\n')
    self.jsonl.flush()

  def progress_to(self, step: int, metrics: dict) -> float:
    """Advances the bar to `step`; returns images/s since the last call."""
    if not self.active:
      return 0.0
    now = time.perf_counter()
    rate = ((step - self._last_step) * self.images_per_step /
            max(now - self._last_time, 1e-9))
    self._last_time, self._last_step = now, step
    self.progress.update(step - self.progress.n)
    self.progress.set_postfix({'img/s': f'{rate:.0f}', **{
        k: f'{float(v):.4g}' for k, v in metrics.items()}})
    return rate

  def message(self, text: str):
    if self.active:
      self.progress.write(text)

  def close(self):
    if self.active:
      self.progress.close()
      self.tensorboard.close()
      self.jsonl.close()
