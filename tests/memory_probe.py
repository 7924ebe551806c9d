"""Peak memory of one call, measured in a fresh process (merge and export stream the weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

PROBE = textwrap.dedent(
    """
    import json, sys, time
    import gguf, transformers, peft, safetensors.torch  # what the call may import lazily, loaded before measuring

    def status(field):
        # VmHWM, not getrusage: ru_maxrss of a child started by fork+exec includes its parent's RSS.
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    import torch
    # BLAS sets up its threads and buffers on the first product: a fixed cost, not the call's.
    (torch.randn(512, 8) @ torch.randn(8, 512)).sum()
    setup, call = sys.argv[1], sys.argv[2]
    exec(setup)
    argv = sys.argv[3:]
    before = status("VmRSS")
    start = time.perf_counter()
    exec(call)
    seconds = time.perf_counter() - start
    print(json.dumps({"growth": status("VmHWM") - before, "seconds": seconds}))
    """
)


def measure(setup: str, call: str, *argv: object) -> dict:
    """``{"growth": peak RSS minus RSS before the call (bytes), "seconds": its wall time}`` of ``call``
    (Python, run after ``setup``; ``argv`` holds the arguments as strings)."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, setup, call, *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])
