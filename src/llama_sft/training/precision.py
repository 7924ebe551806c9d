"""The dtype a run computes in on this machine.

Contract: ``cpu_bf16_is_fast()`` says whether bfloat16 matrix products beat float32 on this CPU,
and why: True where the CPU has native bfloat16 matrix instructions (x86 ``avx512_bf16`` or
``amx_bf16``); False on an x86 CPU without them, where oneDNN still reports bfloat16 support but
emulates it; elsewhere (ARM, a machine without /proc/cpuinfo) a timed probe of both dtypes,
cached per CPU in ``~/.cache/llama_sft/cpu_dtype.json``. ``LLAMA_SFT_CPU_BF16=1`` or ``0``
overrides. ``resolve_for_machine(values, machine)`` turns a GPU recipe's parsed precision and
device values into the fast choice for this machine, each change announced once.

Why: ``--fp16`` and ``--torch_dtype float16`` are GPU settings (float16 products on a CPU run far
slower than float32 ones), and bfloat16 only pays where the CPU multiplies in it natively: where
it is emulated, the benchmark trained slower in bfloat16 than in float32 (docs/performance.md,
Choosing the dtype on a CPU).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from datetime import timedelta
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


@dataclass(frozen=True)
class Machine:
    """What the flags are resolved against: a GPU or not, the CPU and whether it multiplies in
    bfloat16 natively, and whether torchrun started this process."""

    cuda: bool
    cpu: str
    bf16_fast: bool
    bf16_why: str
    under_torchrun: bool
    # The flash-attn package (2.x) can run here: installed, and a CUDA GPU present.
    flash_attn: bool = False

    @classmethod
    def detect(cls) -> Machine:
        from transformers.utils import is_flash_attn_2_available

        fast, why = cpu_bf16_is_fast()
        cuda = torch.cuda.is_available()
        flash = cuda and is_flash_attn_2_available()
        return cls(cuda, cpu_flags()[0], fast, why, "LOCAL_RANK" in os.environ, flash)


def resolve_for_machine(values: dict, machine: Machine) -> dict:
    """The flag values this machine runs instead of the parsed ones (name: value), each change
    announced once. A GPU recipe runs at full speed on a CPU: --fp16 becomes bfloat16 autocast
    where the CPU multiplies in bfloat16 natively, float32 elsewhere; float16 weights load in
    bfloat16 or float32; DeepSpeed on a CPU runs in float32, its processes grouped over gloo.
    flash_attention_2 runs where flash-attn can (a CUDA GPU, the package installed), sdpa elsewhere."""
    changes: dict = {}
    deepspeed = bool(values.get("deepspeed"))
    if values.get("attn_implementation") == "flash_attention_2" and not machine.flash_attn:
        missing = "the flash-attn package is not installed" if machine.cuda else "no CUDA GPU here"
        logger.warning(
            "flash_attention_2 (--use_flash_attention_2, --flash_attn): %s, so attention runs with PyTorch's "
            "sdpa instead",
            missing,
        )
        changes["attn_implementation"] = "sdpa"
    if machine.cuda:
        return changes
    if deepspeed and values.get("dataloader_pin_memory"):
        # use_cpu turns pinning off, but DeepSpeed runs without it; there is no device to pin for.
        changes["dataloader_pin_memory"] = False
    if deepspeed and machine.under_torchrun:
        changes["accelerator_config"] = {"use_configured_state": True}
        start_gloo(values)
    if not deepspeed:
        # Without use_cpu, transformers refuses --bf16 on a CPU-only machine.
        changes["use_cpu"] = True
    fp16, bf16 = values["fp16"], values["bf16"]
    if fp16:
        changes["fp16"] = False
        if machine.bf16_fast and not deepspeed:
            logger.warning(
                "--fp16: no GPU here; float16 on a CPU runs ~100x slower, so training uses bfloat16 autocast (%s)",
                machine.bf16_why,
            )
            changes["bf16"] = bf16 = True
        else:
            reason = "DeepSpeed on a CPU runs in float32" if deepspeed else machine.bf16_why
            logger.warning(
                "--fp16: no GPU here; float16 on a CPU runs ~100x slower, so training runs in float32 (%s)",
                reason,
            )
    elif not bf16:
        logger.info("training in float32 (no --fp16 or --bf16); bfloat16 here: %s", machine.bf16_why)
    if bf16 and deepspeed:
        logger.warning("--bf16 with DeepSpeed on a CPU is not supported; training runs in float32")
        changes["bf16"] = bf16 = False
    elif values["bf16"] and not machine.bf16_fast:
        logger.warning(
            "--bf16 on this CPU: bfloat16 is emulated here and slower than float32 (%s)", machine.bf16_why
        )
    if values.get("torch_dtype") == "float16":
        if bf16 and machine.bf16_fast:
            # Autocast multiplies in bfloat16 anyway; frozen bfloat16 weights skip that cast every step
            # and halve their memory. Trainable weights stay float32 (model.attach_lora).
            logger.warning("--torch_dtype float16: no GPU here; loading the frozen weights in bfloat16")
            changes["torch_dtype"] = "bfloat16"
        else:
            logger.warning("--torch_dtype float16: no GPU here; loading the weights in float32 instead")
            changes["torch_dtype"] = "float32"
    return changes


def start_gloo(values: dict) -> None:
    """DeepSpeed under torchrun on a CPU-only machine: start the process group over gloo first.

    accelerate gives DeepSpeed no backend when there is no GPU, and then every process believes it
    is rank 0 of 1 (DeepSpeed's batch-size check fails with N processes). A PartialState made first
    with gloo, and TrainingArguments told to use it (``use_configured_state``), gives every process
    its real rank. It must exist before TrainingArguments is built, which sets up the devices.
    """
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    # DeepSpeed prints a line to stdout as it builds its shared-memory op; nothing a user can act on.
    with contextlib.redirect_stdout(io.StringIO()):
        PartialState(backend="gloo", timeout=timedelta(seconds=float(values.get("ddp_timeout") or 1800)))
