"""Where metrics go: TensorBoard event files, a JSON-lines log, the console.

Everything under the workdir goes through etils.epath, so gs:// works. The
JSON-lines log is rewritten whole on each write (object stores cannot
append); on resume, entries of steps after the checkpoint (steps that are
about to be run again) are dropped, so each step appears once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import jax
import numpy as np
import tqdm
from etils import epath

from condconv_jax import paths


class MetricsLog:
  """Writes on process 0 only; other processes keep quiet."""

  def __init__(self, workdir: epath.Path, total_steps: int, start_step: int,
               images_per_step: int):
    self.active = jax.process_index() == 0
    self.images_per_step = images_per_step
    if not self.active:
      return
    self.tensorboard = _tensorboard_writer(workdir / 'tensorboard')
    self.jsonl_path = workdir / 'metrics.jsonl'
    self.lines = []
    if self.jsonl_path.exists():
      self.lines = [line for line in self.jsonl_path.read_text().splitlines()
                    if line and json.loads(line)['step'] <= start_step]
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
    self.tensorboard.flush()
    self.lines.append(json.dumps({'step': step, 'split': split, **metrics}))
    paths.write_text(self.jsonl_path, '\n'.join(self.lines) + '\n')

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


def _tensorboard_writer(logdir: epath.Path):
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  if not paths.is_remote(logdir):
    return SummaryWriter(str(logdir))
  return _MirroredSummaryWriter(logdir)


class _MirroredSummaryWriter:
  """TensorBoard events for a remote logdir: written to a local temporary
  folder and copied to the logdir (whole files, through epath) on every
  flush and at close. tensorboardX's own gs:// writer needs no copy, but it
  uploads once more from its finalizer at interpreter exit, which hangs for
  minutes when the store is unreachable by then."""

  def __init__(self, logdir: epath.Path):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.logdir = logdir
    self.local = tempfile.mkdtemp(prefix='tensorboard_')
    self.writer = SummaryWriter(self.local, flush_secs=10**6)

  def add_scalar(self, *args, **kwargs):
    self.writer.add_scalar(*args, **kwargs)

  def _copy(self):
    self.logdir.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(self.local):
      with open(os.path.join(self.local, name), 'rb') as f:
        (self.logdir / name).write_bytes(f.read())

  def flush(self):
    self.writer.flush()
    self._copy()

  def close(self):
    self.writer.close()
    self._copy()
    shutil.rmtree(self.local, ignore_errors=True)
