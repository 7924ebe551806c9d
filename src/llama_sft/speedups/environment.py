"""Process environment for fast CPU training, set before PyTorch is imported.

Contract: ``set_defaults()`` sets the variables below unless the user set them, and returns the
ones it set. It must run before the first ``import torch`` of the process (PyTorch reads them at
its first allocation and first matrix product); ``llama_sft.speedups`` calls it when imported,
except under ``--speedups off``.

Why each:
- ``LRU_CACHE_CAPACITY``, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``: oneDNN (bfloat16 products on a
  CPU) caches a compiled kernel per matrix shape, 1,024 by default. Packed rows have a new length
  every step, so the caches grew RSS by ~20 MB a step; 64 holds every shape of a step (at 8 the
  products ran ~25% slower).
- ``THP_MEM_ALLOC_ENABLE``: a step's large CPU tensors (logits, vocabulary-sized gradients) are new
  allocations whose 4 KiB pages fault in on first touch; PyTorch asks for transparent huge pages
  for allocations of 2 MiB and more when this is set (a fresh 113 MB tensor: 33 ms to zero in
  4 KiB pages, 20-24 ms in 2 MiB pages).
"""

from __future__ import annotations

import os
import sys

DEFAULTS = {
    "LRU_CACHE_CAPACITY": "64",
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64",
    "THP_MEM_ALLOC_ENABLE": "1",
}
# What set_defaults did at import, for the start-up report.
applied: dict[str, str] = {}


def switched_off(argv: list[str]) -> bool:
    """Whether the command line asks for ``--speedups off`` (read before arguments are parsed)."""
    return any(
        a == "--speedups=off" or (a == "--speedups" and i + 1 < len(argv) and argv[i + 1] == "off")
        for i, a in enumerate(argv)
    )


def set_defaults() -> dict[str, str]:
    if switched_off(sys.argv[1:]):
        return {}
    for name, value in DEFAULTS.items():
        if name not in os.environ:
            os.environ[name] = value
            applied[name] = value
    return dict(applied)
