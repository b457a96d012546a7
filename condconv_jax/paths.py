"""Paths on any filesystem: local disk, gs:// and whatever else etils.epath
handles (what orbax uses), never bare `open`/`os.path`."""

from __future__ import annotations

import json
import os

import fsspec
from etils import epath

# gs:// through fsspec/gcsfs, not tf.io.gfile (epath's choice when tensorflow
# is importable): gfile's GCS endpoint is hard-coded, so no emulator can
# stand in for it and the tests could not run the path production runs.
os.environ.setdefault('EPATH_USE_TF', 'false')
# gcsfs caches folder listings per process: a file another host (re)wrote
# after this one listed the folder then reads back stale or cut short, and a
# new one reports exists() == False. Multi-host resume needs fresh listings.
fsspec.config.conf.setdefault('gcs', {})['use_listings_cache'] = False


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
