"""The training run (``run.py``, top to bottom) and what it is made of: typed arguments, the
dtype chosen for this machine, the base model and LoRA, the Trainer, checkpoints and saving, and
the memory planner of ``--dry_run``."""
