"""Training and evaluation from ml-collections configs (see train.py, eval.py)."""
