"""The table `train.py` prints for config.compare_num_experts (and
config.compare_seeds): one row per run, then each model's mean and
seed-to-seed standard deviation."""

from __future__ import annotations

import numpy as np

# (summary key, column, is a fraction shown as a percentage)
DETECTOR_COLUMNS = (
    ('validation_AP50', 'val AP50', True),
    ('eval_AP', 'AP', True), ('eval_AP50', 'AP50', True),
    ('eval_box_precision', 'box P', True), ('eval_box_recall', 'box R', True),
    ('eval_score_threshold', 'score >=', False))
CLASSIFIER_COLUMNS = (('eval_accuracy', 'accuracy', True),)


def _columns(summary):
  columns = DETECTOR_COLUMNS if 'eval_AP' in summary else CLASSIFIER_COLUMNS
  return [c for c in columns if c[0] in summary]


def _cell(value, percent: bool) -> str:
  return f'{100 * value:.2f}%' if percent else f'{value:.2f}'


def table(config, rows) -> str:
  """rows: [(seed, num_experts, summary)] -> a Markdown table."""
  columns = _columns(rows[0][2])
  split = config.eval_split or 'evaluation split'
  seeds = sorted({seed for seed, _, _ in rows})
  lines = [f'\n{config.model} on {config.dataset} ({split}; "val": '
           f'validation), seeds {", ".join(map(str, seeds))}',
           '| seed | experts | params | MADDs | ' +
           ' | '.join(c[1] for c in columns) + ' |',
           '|---:|---:|---:|---:|' + '---:|' * len(columns)]
  for seed, num_experts, s in rows:
    values = ' | '.join(_cell(s[key], pct) for key, _, pct in columns)
    lines.append(f'| {seed} | {num_experts} | {s["params"]:,} | '
                 f'{s["macs"] / 1e6:.2f}M | {values} |')
  if len(seeds) > 1:
    for num_experts in dict.fromkeys(e for _, e, _ in rows):
      runs = [s for _, e, s in rows if e == num_experts]
      cells = []
      for key, _, pct in columns:
        values = np.array([s[key] for s in runs], np.float64)
        scale = 100 if pct else 1
        unit = '%' if pct else ''
        cells.append(f'{scale * values.mean():.2f} ± '
                     f'{scale * values.std(ddof=1):.2f}{unit}')
      lines.append(f'| mean ± sd | {num_experts} | {runs[0]["params"]:,} | '
                   f'{runs[0]["macs"] / 1e6:.2f}M | {" | ".join(cells)} |')
  return '\n'.join(lines)
