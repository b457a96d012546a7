"""Imports run one way: core -> detection -> models -> data, convert ->
training -> export (its command line reads runs) -> entry points and
benchmarks; and a module's imports of the
project sit at its top, where a reader looks for them."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[1]
PACKAGE = ROOT / 'condconv_jax'
# A module may import modules of its own layer or of a lower one.
LAYERS = {'detection': 1, 'models': 2, 'data': 3, 'convert': 3,
          'training': 4, 'export': 5}
CORE = 0  # every other module of the package


def layer(module: str) -> int:
  """condconv_jax.a.b -> the layer of its first component."""
  parts = module.split('.')
  return LAYERS.get(parts[1], CORE) if len(parts) > 1 else CORE


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def project_imports(tree):
  """(node, imported module) of every import of condconv_jax, configs,
  benchmarks or tests."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [f'{node.module}.{alias.name}' for alias in node.names]
    else:
      continue
    for name in names:
      if name.split('.')[0] in ('condconv_jax', 'configs', 'benchmarks',
                                'tests'):
        yield node, name


PACKAGE_MODULES = sorted(PACKAGE.rglob('*.py'))


@pytest.mark.parametrize('path', PACKAGE_MODULES,
                         ids=[module_name(p) for p in PACKAGE_MODULES])
def test_package_imports_run_one_way_from_the_top(path):
  tree = ast.parse(path.read_text())
  top_level = set(map(id, tree.body))
  me = module_name(path)
  for node, name in project_imports(tree):
    assert name.startswith('condconv_jax'), (
        f'{me} imports {name}: the library never imports the experiment '
        'configs, the benchmarks or the tests.')
    target = '.'.join(name.split('.')[:3])
    assert layer(target) <= layer(me), (
        f'{me} (layer {layer(me)}) imports {name} (layer {layer(target)}).')
    assert id(node) in top_level, (
        f'{me} imports {name} inside a function (line {node.lineno}).')


def test_the_layering_is_checked_on_real_imports():
  # The rule above must see the imports it rules on: the trainer's.
  tree = ast.parse((PACKAGE / 'training' / 'trainer.py').read_text())
  names = {name for _, name in project_imports(tree)}
  assert 'condconv_jax.models.get_model' in names
  assert layer('condconv_jax.models.cost') == LAYERS['models']
  assert layer('condconv_jax.static_ops') == CORE


def test_benchmarks_import_each_other_as_a_package():
  for path in sorted((ROOT / 'benchmarks').glob('*.py')):
    text = path.read_text()
    assert 'sys.path' not in text, f'{path.name} edits sys.path'
    for node, name in project_imports(ast.parse(text)):
      del node
      assert not name.startswith(('tests', 'configs')), (path.name, name)
