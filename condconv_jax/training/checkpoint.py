"""Orbax checkpoints of the train state under <workdir>/checkpoints, on any
filesystem orbax handles (local disk, gs://)."""

from __future__ import annotations

import contextlib
import sys

import orbax.checkpoint as ocp
from absl import logging
from etils import epath


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be read; the message says which and what to do."""


def manager(workdir: epath.Path, config, *, read_only: bool = False):
  if read_only:  # what orbax forces (and warns about) when reading only
    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, max_to_keep=None, save_interval_steps=0)
  else:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints,
        enable_async_checkpointing=config.async_checkpointing)
  with _quiet_absl():  # "Given directory is read only" on every read
    return ocp.CheckpointManager(workdir / 'checkpoints', options=options)


def save(mngr, step: int, state, *, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def restore(mngr, abstract_state, step: int | None = None):
  """Restores `step` (default: the latest) into the shape/sharding of
  `abstract_state`. A checkpoint that cannot be read raises CheckpointError
  naming it and what to do; nothing on disk is changed."""
  steps = list(mngr.all_steps())
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'no checkpoint in {mngr.directory}.')
  if step not in steps:
    raise CheckpointError(f'no checkpoint of step {step} in '
                          f'{mngr.directory}; steps kept: {steps}.')
  _silence_closed_loop_callbacks()
  try:
    # orbax logs each failure at ERROR before raising; the error says it.
    with _quiet_absl():
      return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except Exception as error:  # orbax/tensorstore raise many types here
    first_line = (str(error).strip().splitlines() or [''])[0][:300]
    earlier = [s for s in steps if s < step]
    remedy = (f'move that folder aside and rerun: the run then resumes from '
              f'step {earlier[-1]}' if earlier else
              'move that folder aside (no earlier checkpoint is kept: the run '
              'would start again from step 0)')
    raise CheckpointError(
        f'checkpoint of step {step} ({mngr.directory / str(step)}) could not '
        f'be restored: {type(error).__name__}: {first_line}. It is corrupt '
        f'or incomplete, or it was written for another model or config. If '
        f'corrupt, {remedy}. Nothing on disk was changed.') from None


@contextlib.contextmanager
def _quiet_absl():
  previous = logging.get_verbosity()
  logging.set_verbosity(logging.FATAL)
  try:
    yield
  finally:
    logging.set_verbosity(previous)


def _silence_closed_loop_callbacks():
  """A failed orbax restore leaves tensorstore reads in flight; when they
  finish (before or after the error reaches us), their callbacks find
  orbax's asyncio loop closed and each prints a "RuntimeError: Event loop is
  closed" traceback, burying the one message that matters. Those (and only
  those) are dropped, from now on in this process."""
  if getattr(sys.excepthook, 'drops_closed_loop_errors', False):
    return

  def is_closed_loop(value):
    return isinstance(value, RuntimeError) and 'Event loop is closed' in str(
        value)

  previous_excepthook, previous_unraisable = (sys.excepthook,
                                              sys.unraisablehook)

  def excepthook(kind, value, traceback):
    if not is_closed_loop(value):
      previous_excepthook(kind, value, traceback)

  def unraisablehook(unraisable):
    if not is_closed_loop(unraisable.exc_value):
      previous_unraisable(unraisable)

  excepthook.drops_closed_loop_errors = True
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def exit_with(error: CheckpointError, program: str):
  """Ends the process with the error as its one message (exit status 1)."""
  sys.stdout.flush()
  sys.exit(f'{program}: {error}')
