"""cpu_setup: one warning on CPU under glibc malloc, and when it stays
silent."""

import warnings

import jax
import pytest

from condconv_jax import CondConv, cpu_setup


pytestmark = pytest.mark.skipif(jax.default_backend() != 'cpu',
                                reason='the warning is about CPU runs')


@pytest.fixture
def fresh(monkeypatch):
  monkeypatch.setattr(cpu_setup, '_warned', False)
  monkeypatch.delenv('LD_PRELOAD', raising=False)
  monkeypatch.delenv('CONDCONV_MALLOC', raising=False)
  return monkeypatch


def test_one_warning_under_glibc_malloc_from_the_first_layer(fresh):
  x = jax.numpy.ones((1, 5, 5, 2))
  with pytest.warns(cpu_setup.SlowAllocatorWarning,
                    match='LD_PRELOAD=.*libtcmalloc_minimal'):
    CondConv(3, 3, num_experts=2).init(jax.random.key(0), x)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # a second one would raise here
    CondConv(3, 3, num_experts=2).init(jax.random.key(0), x)


@pytest.mark.parametrize('env', [
    {'LD_PRELOAD': cpu_setup.TCMALLOC}, {'CONDCONV_MALLOC': 'system'}, {}])
def test_silent_with_tcmalloc_when_opted_out_or_off_cpu(fresh, env):
  for name, value in env.items():
    fresh.setenv(name, value)
  if not env:  # glibc malloc, on an accelerator
    fresh.setattr(jax, 'default_backend', lambda: 'gpu')
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    cpu_setup.check_allocator()
