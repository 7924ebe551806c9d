"""Fused CPU kernels for LoRA dropout, the cross-entropy, RMSNorm and SwiGLU, built on first use.

Contract: ``kernels()`` returns the compiled ``cpu_kernels.c`` (through ctypes) or None when it
cannot be had (no C compiler, a failed build, ``LLAMA_SFT_CPU_KERNELS=0``); every caller has a
plain PyTorch path for None, so the kernels only change speed, never whether training runs.

- ``masked_scale(x, seed, threshold, scale)``: ``x * scale`` where element i's 32 random bits
  (SplitMix64 from ``seed``; they depend only on ``seed`` and i) are ``>= threshold``, else 0.
  Called again with the same seed on the gradient, it applies the same mask: the dropout's
  backward keeps a seed, not a mask.
- ``softmax_xent(logits, targets, grad)`` (where ``takes_logits``): per-row cross-entropy of (n, vocab) logits against
  (n,) targets (-100 ignored, loss 0), and with ``grad`` (which may be ``logits``) softmax minus
  the one-hot target written there, in the logits' dtype, one row at a time while it is in cache.
- ``rms_norm(x, weight, eps)``: transformers' LlamaRMSNorm of each row of ``x`` (float32 inside,
  the normalised row rounded to the input dtype, then times ``weight``), and each row's
  1 / sqrt(mean(x^2) + eps); ``rms_norm_backward(grad, x, weight, rstd)``: the gradient of ``x``
  for a frozen ``weight``, from ``x`` and those values alone.
- ``swiglu(gate, up)``: ``silu(gate) * up`` as transformers' LlamaMLP computes it (the SiLU
  rounded to the dtype before the product); ``swiglu_backward(grad, gate, up)``: the gradients of
  ``gate`` and ``up``, the SiLU recomputed from ``gate``.
- ``causal_attention(q, k, v, starts, scale)``: causal attention of each record of a packed row
  (record i is tokens ``starts[i]:starts[i + 1]``) on its own, for (1, heads, n, head_dim) queries
  and (1, kv_heads, n, head_dim) keys and values in any strides with contiguous rows (head_dim a
  multiple of 16, ``attention_takes``): the (1, n, heads, head_dim) output and the float32 log-sum
  of each row's exponentials; ``causal_attention_backward`` gives the three gradients from those.
- ``rotary(x, cos, sin, backward)``: transformers' ``apply_rotary_pos_emb`` for one (1, heads, n,
  head_dim) tensor and (1, n, head_dim) cos and sin, rounded as its ops round (``rotary_takes``);
  with ``backward``, the gradient of its input from the gradient of its output.

All take float32 or bfloat16 CPU tensors (``supports``) and use torch's thread count.

Why: PyTorch runs LoRA dropout as four passes over each input (random bits, comparison, select,
scale) plus two in the backward and keeps a boolean mask, and LoRA on seven projections drops
~35,000 elements a token; the kernel does it in one pass each way and keeps only a seed. The
cross-entropy in chunks of PyTorch ops makes new tensors per chunk; the kernel takes one row of
logits at a time while it is in cache (docs/performance.md, The speed-ups: `bits_dropout` and
`labelled_logits`).

The library is built once per source, compiler and CPU (``-march=native``) into
``~/.cache/llama_sft/kernels`` (``LLAMA_SFT_KERNEL_DIR`` moves it), under a temporary name and
renamed, so concurrent processes of one run never load a half-written file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..data.encode import IGNORE_INDEX

logger = logging.getLogger("llama_sft")

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
# A compiler without OpenMP (Apple's clang) still builds the kernels, single-threaded.
SERIAL_FLAGS = [flag for flag in FLAGS if flag != "-fopenmp"]
DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _cpu_flags() -> str:
    # The library is built for this CPU's instruction set; a cache folder shared with other
    # machines must not hand one built for another.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(cache_dir: Path, flags: list[str]) -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, compiler.encode(), " ".join(flags).encode(), _cpu_flags().encode()])
    )
    target = cache_dir / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", str(built), "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target


class _AttentionShape(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_int64)
        for name in ("heads", "kv_heads", "head_dim", "q_row", "q_head", "k_row", "k_head", "v_row", "v_head")
    ] + [("scale", ctypes.c_float)]


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, u64, u32, f32, i32 = (
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_uint64,
        ctypes.c_uint32,
        ctypes.c_float,
        ctypes.c_int,
    )
    for suffix in DTYPES.values():
        masked = getattr(lib, f"masked_scale_{suffix}")
        masked.argtypes = [p, p, i64, u64, u32, f32, i32]
        masked.restype = None
        xent = getattr(lib, f"softmax_xent_{suffix}")
        xent.argtypes = [p, p, p, i64, i64, i64, i64, p, i32]
        xent.restype = i64
        norm = getattr(lib, f"rms_norm_{suffix}")
        norm.argtypes = [p, p, p, p, i64, i64, f32, i32]
        norm.restype = None
        norm_backward = getattr(lib, f"rms_norm_backward_{suffix}")
        norm_backward.argtypes = [p, p, p, p, p, i64, i64, i32]
        norm_backward.restype = None
        swiglu = getattr(lib, f"swiglu_{suffix}")
        swiglu.argtypes = [p, p, p, i64, i32]
        swiglu.restype = None
        swiglu_backward = getattr(lib, f"swiglu_backward_{suffix}")
        swiglu_backward.argtypes = [p, p, p, p, p, i64, i32]
        swiglu_backward.restype = None
        rotary = getattr(lib, f"rotary_{suffix}")
        rotary.argtypes = [p, i64, i64, p, p, p, i64, i64, i64, i32, i32]
        rotary.restype = None
    shape = ctypes.POINTER(_AttentionShape)
    lib.causal_attention.argtypes = [p, p, p, p, p, p, i64, shape, i32, i32]
    lib.causal_attention.restype = None
    lib.causal_attention_backward.argtypes = [p, p, p, p, p, p, p, p, p, p, i64, shape, i32, i32]
    lib.causal_attention_backward.restype = None
    return lib


_enabled = True


def set_enabled(on: bool) -> None:
    """Switch the kernels on or off for this process (``--skip_speedups cpu_kernels``)."""
    global _enabled
    _enabled = on


def kernels() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they cannot be built or are switched off."""
    return _library() if _enabled else None


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (logged once) when they cannot be built or are switched off."""
    if os.environ.get("LLAMA_SFT_CPU_KERNELS", "1") == "0":
        return None
    cache_dir = Path(
        os.environ.get("LLAMA_SFT_KERNEL_DIR") or Path.home() / ".cache" / "llama_sft" / "kernels"
    )
    for flags in (FLAGS, SERIAL_FLAGS):
        try:
            return _declare(ctypes.CDLL(str(_build(cache_dir, flags))))
        except (OSError, subprocess.SubprocessError) as exc:
            error = exc
    logger.warning("CPU kernels unavailable (%s); using PyTorch's ops for dropout and the loss", error)
    return None


kernels.cache_clear = _library.cache_clear  # a test or benchmark that changes the environment


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the kernels exist and take these tensors (float32 or bfloat16, on the CPU)."""
    return all(t.device.type == "cpu" and t.dtype in DTYPES for t in tensors) and kernels() is not None


def takes_logits(logits: torch.Tensor, grad: torch.Tensor | None) -> bool:
    """Whether ``softmax_xent`` takes these: supported tensors whose rows are contiguous, ``grad``
    laid out as ``logits``."""
    rows_contiguous = logits.dim() == 2 and logits.stride(1) == 1
    return rows_contiguous and (grad is None or grad.stride() == logits.stride()) and supports(logits)


def masked_scale(x: torch.Tensor, seed: int, threshold: int, scale: float) -> torch.Tensor:
    """``x * scale`` where the 32 random bits of an element (from ``seed``) are >= ``threshold``,
    else 0; a new tensor."""
    x = x.contiguous()
    out = torch.empty_like(x)
    kernel = getattr(kernels(), f"masked_scale_{DTYPES[x.dtype]}")
    kernel(x.data_ptr(), out.data_ptr(), x.numel(), seed, threshold, scale, torch.get_num_threads())
    return out


def softmax_xent(logits: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """Float32 (n,) cross-entropy of each row of ``logits`` (n, vocab) against ``targets`` (n,), 0
    where the target is -100; with ``grad`` (same shape and dtype, may be ``logits``), writes
    softmax - one_hot(target) there, zero rows where ignored."""
    if not takes_logits(logits, grad):
        raise ValueError("softmax_xent needs rows of contiguous values, the same strides for grad")
    rows, vocab = logits.shape
    targets = targets.to(torch.int64).contiguous()
    losses = torch.empty(rows, dtype=torch.float32)
    kernel = getattr(kernels(), f"softmax_xent_{DTYPES[logits.dtype]}")
    bad = kernel(
        logits.data_ptr(),
        None if grad is None else grad.data_ptr(),
        targets.data_ptr(),
        rows,
        vocab,
        logits.stride(0),
        IGNORE_INDEX,
        losses.data_ptr(),
        torch.get_num_threads(),
    )
    if bad >= 0:
        raise IndexError(f"target {int(targets[bad])} of row {bad} is outside a vocabulary of {vocab}")
    return losses


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm of the rows of ``x`` (..., width) times ``weight`` (width,), of ``x``'s dtype; the
    float32 (rows,) reciprocal root mean squares for ``rms_norm_backward``)."""
    x = x.contiguous()
    width = x.shape[-1]
    out = torch.empty_like(x)
    rstd = torch.empty(x.numel() // width, dtype=torch.float32)
    kernel = getattr(kernels(), f"rms_norm_{DTYPES[x.dtype]}")
    kernel(
        x.data_ptr(), weight.contiguous().data_ptr(), out.data_ptr(), rstd.data_ptr(),
        rstd.numel(), width, eps, torch.get_num_threads(),
    )  # fmt: skip
    return out, rstd


def rms_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """The gradient of ``rms_norm``'s ``x`` given the gradient of its output, ``weight`` frozen."""
    grad = grad.contiguous()
    out = torch.empty_like(x)
    kernel = getattr(kernels(), f"rms_norm_backward_{DTYPES[x.dtype]}")
    kernel(
        grad.data_ptr(), x.data_ptr(), weight.contiguous().data_ptr(), rstd.data_ptr(), out.data_ptr(),
        rstd.numel(), x.shape[-1], torch.get_num_threads(),
    )  # fmt: skip
    return out


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for contiguous ``gate`` and ``up`` of one shape and dtype; a new tensor."""
    out = torch.empty_like(gate)
    kernel = getattr(kernels(), f"swiglu_{DTYPES[gate.dtype]}")
    kernel(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), torch.get_num_threads())
    return out


def swiglu_backward(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``swiglu``'s ``gate`` and ``up`` given the gradient of its output."""
    grad = grad.contiguous()
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    kernel = getattr(kernels(), f"swiglu_backward_{DTYPES[gate.dtype]}")
    kernel(
        grad.data_ptr(), gate.data_ptr(), up.data_ptr(), d_gate.data_ptr(), d_up.data_ptr(), gate.numel(),
        torch.get_num_threads(),
    )  # fmt: skip
    return d_gate, d_up


def attention_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``causal_attention`` takes these (1, heads, n, head_dim) tensors: one supported
    dtype, rows of contiguous values, head_dim a multiple of 16, heads a multiple of kv_heads."""
    return (
        q.dim() == k.dim() == v.dim() == 4
        and q.shape[0] == 1
        and q.dtype == k.dtype == v.dtype
        and q.shape[-1] % 16 == 0
        and k.shape == v.shape
        and k.shape[2] == q.shape[2]
        and q.shape[1] % k.shape[1] == 0
        and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        and supports(q, k, v)
    )


def _attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> _AttentionShape:
    return _AttentionShape(
        q.shape[1], k.shape[1], q.shape[3], q.stride(2), q.stride(1), k.stride(2), k.stride(1),
        v.stride(2), v.stride(1), scale,
    )  # fmt: skip


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the (1, n, heads, head_dim) output, the float32 (heads, n) log-sum-exp of each row's scores)
    of causal attention within each record; ``starts`` int64 (records + 1,), from 0 to n."""
    _, heads, n, head_dim = q.shape
    out = torch.empty(1, n, heads, head_dim, dtype=q.dtype)
    lse = torch.empty(heads, n, dtype=torch.float32)
    kernels().causal_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), starts.data_ptr(),
        starts.numel() - 1, ctypes.byref(_attention_shape(q, k, v, scale)), q.dtype == torch.bfloat16,
        torch.get_num_threads(),
    )  # fmt: skip
    return out, lse


def causal_attention_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    starts: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``causal_attention``'s q, k and v (shaped as they are, laid out as
    (n, heads, head_dim)) given the gradient of its output."""
    grad = grad.contiguous()
    _, heads, n, head_dim = q.shape
    dq = torch.empty(1, n, heads, head_dim, dtype=q.dtype)
    dk = torch.empty(1, n, k.shape[1], head_dim, dtype=q.dtype)
    dv = torch.empty_like(dk)
    kernels().causal_attention_backward(
        grad.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
        dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), starts.data_ptr(), starts.numel() - 1,
        ctypes.byref(_attention_shape(q, k, v, scale)), q.dtype == torch.bfloat16, torch.get_num_threads(),
    )  # fmt: skip
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def rotary_takes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether ``rotary`` takes these: (1, heads, n, head_dim) ``x`` with contiguous rows, head_dim
    even, (1, n, head_dim) ``cos`` and ``sin``, all of one supported dtype."""
    return (
        x.dim() == 4
        and x.shape[0] == 1
        and x.shape[-1] % 2 == 0
        and x.stride(-1) == 1
        and cos.shape == sin.shape == (1, x.shape[2], x.shape[3])
        and x.dtype == cos.dtype == sin.dtype
        and supports(x, cos, sin)
    )


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (or, with ``backward``, that map's transpose applied to a
    gradient), shaped as ``x`` and laid out as (n, heads, head_dim)."""
    _, heads, n, head_dim = x.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(1, n, heads, head_dim, dtype=x.dtype)
    getattr(kernels(), f"rotary_{DTYPES[x.dtype]}")(
        x.data_ptr(), x.stride(2), x.stride(1), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), n, heads,
        head_dim, backward, torch.get_num_threads(),
    )  # fmt: skip
    return out.transpose(1, 2)
