"""The dtype a run computes in on this machine.

Contract: ``cpu_bf16_is_fast()`` says whether bfloat16 matrix products beat float32 on this CPU,
and why: True where the CPU has native bfloat16 matrix instructions (x86 ``avx512_bf16`` or
``amx_bf16``); False on an x86 CPU without them, where oneDNN still reports bfloat16 support but
emulates it; elsewhere (ARM, a machine without /proc/cpuinfo) a timed probe of both dtypes,
cached per CPU in ``~/.cache/llama_sft/cpu_dtype.json``. ``LLAMA_SFT_CPU_BF16=1`` or ``0``
overrides. ``plan_cpu_precision(args)`` turns a GPU recipe's precision flags into the fast choice
for this CPU, each change announced, as extra flags to parse.

Why: ``--fp16`` and ``--torch_dtype float16`` are GPU settings (float16 products on a CPU run ~100x
slower), and bfloat16 only pays where the CPU multiplies in it natively: on an AVX-512 Xeon
without ``avx512_bf16`` the benchmark's bfloat16 run made 586 tokens/s against 1,399 in float32.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

logger = logging.getLogger("llama_sft")

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
PROBE_CACHE = Path.home() / ".cache" / "llama_sft" / "cpu_dtype.json"


def cpu_flags() -> tuple[str, set[str]]:
    """(CPU model name, feature flags) from /proc/cpuinfo; ("", set()) where there is none."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def _probe_rate(dtype: torch.dtype, size: int = 512, seconds: float = 0.15) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return count / (time.perf_counter() - start)


def _probe(model: str, flags: set[str]) -> tuple[bool, str]:
    key = hashlib.sha256((model + " ".join(sorted(flags)) + torch.__version__).encode()).hexdigest()[:16]
    try:
        cached = json.loads(PROBE_CACHE.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        cached = None
    if cached is None:
        f32, bf16 = _probe_rate(torch.float32), _probe_rate(torch.bfloat16)
        cached = {"fast": bf16 > 1.2 * f32, "ratio": round(bf16 / f32, 2)}
        try:
            PROBE_CACHE.parent.mkdir(parents=True, exist_ok=True)
            table = json.loads(PROBE_CACHE.read_text()) if PROBE_CACHE.is_file() else {}
            PROBE_CACHE.write_text(json.dumps({**table, key: cached}))
        except (OSError, ValueError):
            pass
    return cached["fast"], f"a timed probe: bfloat16 products at {cached['ratio']}x float32's rate"


@functools.cache
def cpu_bf16_is_fast() -> tuple[bool, str]:
    forced = os.environ.get("LLAMA_SFT_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1", f"LLAMA_SFT_CPU_BF16={forced}"
    model, flags = cpu_flags()
    native = sorted(set(NATIVE_BF16_FLAGS) & flags)
    if native:
        return True, f"{model} has native bfloat16 instructions ({', '.join(native)})"
    if "avx2" in flags or "avx512f" in flags:  # x86 without them: oneDNN emulates bfloat16
        return False, f"{model} has no native bfloat16 instructions (no avx512_bf16 or amx_bf16)"
    return _probe(model, flags)


def plan_cpu_precision(args) -> list[str]:
    """Flags that make a GPU recipe run at full speed on a CPU, each announced to the user."""
    extra = []
    fast, why = cpu_bf16_is_fast()
    training = args.training
    if training.fp16:
        if fast and not training.deepspeed:
            logger.warning(
                "--fp16: no GPU here; float16 on a CPU runs ~100x slower, so training uses bfloat16 autocast (%s)",
                why,
            )
            extra += ["--fp16", "False", "--bf16", "True"]
        else:
            reason = "DeepSpeed on a CPU runs in float32" if training.deepspeed else why
            logger.warning(
                "--fp16: no GPU here; float16 on a CPU runs ~100x slower, so training runs in float32 (%s)",
                reason,
            )
            extra += ["--fp16", "False"]
    if not (training.fp16 or training.bf16):
        logger.info("training in float32 (no --fp16 or --bf16); bfloat16 here: %s", why)
    if training.bf16 and training.deepspeed:
        logger.warning("--bf16 with DeepSpeed on a CPU is not supported; training runs in float32")
        extra += ["--bf16", "False"]
    elif training.bf16 and not fast:
        logger.warning("--bf16 on this CPU: bfloat16 is emulated here and slower than float32 (%s)", why)
    if args.model.torch_dtype == "float16":
        autocast = (training.fp16 or training.bf16) and not training.deepspeed
        if autocast and fast:
            # Autocast multiplies in bfloat16 anyway; frozen bfloat16 weights skip that cast every step
            # and halve their memory. Trainable weights stay float32 (model.attach_lora).
            logger.warning("--torch_dtype float16: no GPU here; loading the frozen weights in bfloat16")
            extra += ["--torch_dtype", "bfloat16"]
        else:
            logger.warning("--torch_dtype float16: no GPU here; loading the weights in float32 instead")
            extra += ["--torch_dtype", "float32"]
    return extra
