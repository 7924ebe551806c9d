"""Process environment for fast CPU training, set before PyTorch is imported.

Contract: ``set_defaults()`` sets the variables below unless the user set them, and returns the
ones it set. It must run before PyTorch's first allocation and first matrix product, where PyTorch
reads them: the training command-line entry calls it (``speedups.prepare_process``) before it
parses flags, unless they say ``--speedups off`` or skip ``cpu_environment``. Importing this module
changes nothing.

Why each:
- ``LRU_CACHE_CAPACITY``, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``: oneDNN (bfloat16 products on a
  CPU) caches a compiled kernel per matrix shape, 1,024 by default. Packed rows have a new length
  every step, so the caches grew RSS every step; 64 holds every shape of a step, and a much
  smaller cache slows the products (docs/performance.md, The speed-ups: `cpu_environment`).
- ``THP_MEM_ALLOC_ENABLE``: a step's large CPU tensors (logits, vocabulary-sized gradients) are new
  allocations whose 4 KiB pages fault in on first touch; PyTorch asks for transparent huge pages
  for allocations of 2 MiB and more when this is set, and a fresh tensor then takes far fewer page
  faults to fill (docs/performance.md, The speed-ups: `cpu_environment`).
"""

from __future__ import annotations

import os

DEFAULTS = {
    "LRU_CACHE_CAPACITY": "64",
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64",
    "THP_MEM_ALLOC_ENABLE": "1",
}
# What set_defaults did, for the start-up report; None until the entry has prepared the process.
applied: dict[str, str] | None = None


def set_defaults() -> dict[str, str]:
    global applied
    applied = applied or {}
    for name, value in DEFAULTS.items():
        if name not in os.environ:
            os.environ[name] = value
            applied[name] = value
    return dict(applied)
