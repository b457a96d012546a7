"""One check for every enum-like option, used where the option is read."""

from __future__ import annotations

from collections.abc import Collection


def check_choice(name: str, value, valid: Collection):
  """Returns `value` if it is one of `valid`; else a ValueError naming the
  option and the valid values (a typo must not silently pick a default:
  `augment='inceptoin'` would otherwise train with augmentation off)."""
  if value not in valid:
    raise ValueError(f'{name} must be one of '
                     f'{", ".join(repr(v) for v in valid)}; got {value!r}.')
  return value
