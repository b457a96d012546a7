"""The workdir as a path on any filesystem: local disk, gs:// and whatever
else etils.epath handles (what orbax uses), never bare `open`/`os.path`.

Also: every process of a multi-host job must see the same workdir, or each
host would keep its own checkpoints and a preempted VM would lose them.
"""

from __future__ import annotations

import json
import os
import secrets

import fsspec
import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

# gs:// through fsspec/gcsfs, not tf.io.gfile (epath's choice when tensorflow
# is importable): gfile's GCS endpoint is hard-coded, so no emulator can
# stand in for it and the tests could not run the path production runs.
os.environ.setdefault('EPATH_USE_TF', 'false')
# gcsfs caches folder listings per process: a file another host (re)wrote
# after this one listed the folder then reads back stale or cut short, and a
# new one reports exists() == False. Multi-host resume needs fresh listings.
fsspec.config.conf.setdefault('gcs', {})['use_listings_cache'] = False

_SHARED_CHECK = '.shared_workdir_check'


def as_path(path: str | epath.Path) -> epath.Path:
  """A path string -> an absolute epath.Path (local paths made absolute,
  URIs like gs://bucket/run kept as they are: never os.path.abspath, which
  turns gs://b/r into <cwd>/gs:/b/r)."""
  text = str(path)
  if not text:
    raise ValueError('empty path: pass a folder or a gs:// URI.')
  return epath.Path(text) if is_remote(text) else epath.Path(text).absolute()


def is_remote(path) -> bool:
  return '://' in str(path)


def write_text(path: epath.Path, text: str):
  """Writes a whole file (object stores have no append or partial write)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def write_json(path: epath.Path, value):
  write_text(path, json.dumps(value, indent=2) + '\n')


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
    write_text(marker, token)
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
