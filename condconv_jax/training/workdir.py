"""Every process of a multi-host job must see the same workdir, or each
host would keep its own checkpoints and a preempted VM would lose them.
"""

from __future__ import annotations

import secrets

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from condconv_jax import paths

_SHARED_CHECK = '.shared_workdir_check'


def check_shared(workdir: epath.Path):
  """Raises on every process unless all processes see the same workdir.

  Process 0 writes a random token into the workdir; each process reads it
  back. A workdir on a host's local disk (or a typo on one host) fails here,
  before any step, instead of diverging into per-host checkpoints.
  """
  if jax.process_count() == 1:
    return
  token = secrets.token_hex(16)
  marker = workdir / _SHARED_CHECK
  if jax.process_index() == 0:
    paths.write_text(marker, token)
  token = bytes(multihost_utils.broadcast_one_to_all(
      np.frombuffer(token.encode(), np.uint8))).decode()
  try:
    sees = marker.exists() and marker.read_text() == token
  except OSError:
    sees = False
  seen = multihost_utils.process_allgather(np.array([sees]))
  multihost_utils.sync_global_devices('workdir shared check done')
  if jax.process_index() == 0:
    marker.unlink(missing_ok=True)
  if not np.all(seen):
    blind = [int(i) for i in np.flatnonzero(~np.asarray(seen).reshape(-1))]
    raise ValueError(
        f'workdir {workdir} is not shared by all {jax.process_count()} '
        f'processes: process(es) {blind} cannot read what process 0 wrote '
        f'there. On several hosts the workdir must be one shared location '
        f'(e.g. gs://bucket/run or a shared file system), not a local path.')
