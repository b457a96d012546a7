"""Orbax checkpoints of the train state under <workdir>/checkpoints."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


def manager(workdir: str, config, *, read_only: bool = False):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints,
      enable_async_checkpointing=config.async_checkpointing,
      read_only=read_only, create=not read_only)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options)


def save(mngr, step: int, state, *, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def restore(mngr, abstract_state, step: int | None = None):
  """Restores `step` (default: the latest) into the shape/sharding of
  `abstract_state`. A checkpoint that cannot be read raises an error naming
  it and what to do; nothing on disk is changed."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {mngr.directory}.')
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except Exception as error:
    raise RuntimeError(
        f'checkpoint {mngr.directory}/{step} could not be restored: '
        f'{type(error).__name__}: {error}. If it is corrupt, move that '
        f'folder aside: the run then resumes from the previous checkpoint '
        f'(steps kept: {list(mngr.all_steps())}).') from error
