"""When to stop for a preemption (SIGTERM), so every process stops at the
same step and that step's checkpoint gets written.

One process: a Python SIGTERM handler sets a flag. Several processes: JAX's
own preemption notifier, which jax.distributed.initialize() installs as a
SIGTERM handler in C++, tells the coordination service, and
`reached_preemption_sync_point` then returns True at the same step on every
process. A Python handler there would replace JAX's: the notice would never
leave the process that got it, and no process would stop.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
  """Context manager; `should_stop(step)` after each finished step (every
  process must ask at every step, from the same first step)."""

  def __init__(self):
    self._requested = False
    self._previous = None

  def __enter__(self):
    if (jax.process_count() == 1 and
        threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._requested
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError as error:
      raise RuntimeError(
          'several processes need JAX\'s preemption service to stop together '
          'on SIGTERM; it is off (jax_enable_preemption_service=False?). '
          'Turn it on, or a preemption will lose the steps since the last '
          f'checkpoint. ({error})') from None

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
