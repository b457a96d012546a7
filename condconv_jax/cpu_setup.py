"""What a CPU run must set before JAX starts: the allocator.

    from condconv_jax import cpu_setup
    cpu_setup.use_tcmalloc()   # first thing in main(), before jax runs

XLA:CPU allocates and frees its large temporaries (activations, gradients)
every step. glibc's malloc hands blocks that large back to the kernel and
takes them again, so they page-fault on every step; tcmalloc keeps them,
which halves some training steps (docs/speed.md).

The allocator must be chosen before the process starts, so `use_tcmalloc`
re-executes the same command line once with LD_PRELOAD set, when Debian's
`libtcmalloc-minimal4` is installed and nothing else is preloaded. It does
nothing when the library is missing, off Linux, when LD_PRELOAD is already
set, or with CONDCONV_MALLOC=system in the environment.

Nothing that can still be set once the process runs does the same
(`mallopt` settings through ctypes were measured, docs/nnx.md), so a
script that does not call `use_tcmalloc` gets one `SlowAllocatorWarning`
on CPU, the first time a CondConv layer or a static conv of the zoo runs
(or is traced), saying how to fix it.
"""

from __future__ import annotations

import os
import sys
import warnings

import jax

TCMALLOC = '/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4'
_OPT_OUT = 'CONDCONV_MALLOC'


def use_tcmalloc(library: str = TCMALLOC) -> None:
  """Re-executes this process with `library` preloaded, if it can (see the
  module doc). Returns when nothing is to be done; otherwise never."""
  if (not sys.platform.startswith('linux') or
      os.environ.get(_OPT_OUT) == 'system' or
      os.environ.get('LD_PRELOAD') or not os.path.exists(library)):
    return
  env = dict(os.environ, LD_PRELOAD=library)  # set: the child won't re-exec
  sys.stdout.flush()
  sys.stderr.flush()
  # orig_argv is the command line as typed ('-m pkg.mod' included).
  os.execve(sys.executable, list(sys.orig_argv), env)


class SlowAllocatorWarning(UserWarning):
  """CPU training under glibc's malloc: about half the speed."""


_warned = False


def check_allocator() -> None:
  """Warns once per process when JAX runs on CPU under glibc's malloc
  (nothing preloaded, CONDCONV_MALLOC not 'system')."""
  global _warned
  if (_warned or allocator() != 'glibc malloc' or
      os.environ.get(_OPT_OUT) == 'system' or
      not sys.platform.startswith('linux') or jax.default_backend() != 'cpu'):
    return
  _warned = True
  warnings.warn(
      'condconv_jax runs on CPU under glibc malloc, where XLA\'s per-step '
      'buffers page-fault: training steps take up to about twice as long '
      '(docs/nnx.md, "CPU speed in your own script"). Install Debian\'s '
      f'libtcmalloc-minimal4 and run with LD_PRELOAD={TCMALLOC} (its '
      'x86-64 path), or call '
      'condconv_jax.cpu_setup.use_tcmalloc() first thing in your main(). '
      'CONDCONV_MALLOC=system silences this.', SlowAllocatorWarning,
      stacklevel=3)


def allocator() -> str:
  """The preloaded allocator's file name, or 'glibc malloc'."""
  preloaded = os.environ.get('LD_PRELOAD', '')
  return os.path.basename(preloaded) if preloaded else 'glibc malloc'
