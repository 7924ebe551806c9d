"""The fused CPU kernels: their random bits, their dropout, their cross-entropy, and their build."""

import logging

import pytest
import torch

from llama_sft.speedups import cpu_kernels

MASK64 = 2**64 - 1


def splitmix64(seed: int, index: int) -> int:
    z = (seed + index * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_scale_keeps_the_elements_whose_splitmix_bits_pass(built, dtype):
    seed, threshold, scale = 12345, 2**31, 1.25
    x = (torch.arange(1, 4100, dtype=torch.float32) / 7).to(dtype)  # odd length, two blocks
    out = cpu_kernels.masked_scale(x, seed, threshold, scale)
    bits = [splitmix64(seed, i // 2) >> (32 * (i % 2)) & 0xFFFFFFFF for i in range(x.numel())]
    keep = torch.tensor([b >= threshold for b in bits])
    assert out.dtype == dtype
    assert torch.equal(out[keep], (x[keep].float() * scale).to(dtype))  # rounded as torch rounds
    assert torch.equal(out[~keep], torch.zeros(int((~keep).sum()), dtype=dtype))
    assert torch.equal(cpu_kernels.masked_scale(x, seed, threshold, scale), out)
    assert not torch.equal(cpu_kernels.masked_scale(x, seed + 1, threshold, scale), out)


def test_masked_scale_keep_rate_and_nan(built):
    x = torch.ones(1_000_000)
    out = cpu_kernels.masked_scale(x, 7, round(0.05 * 2**32), 2.0)
    # 1e6 draws: the kept share's standard deviation is 2.2e-4.
    assert abs((out != 0).float().mean().item() - 0.95) < 1.5e-3
    assert set(out.unique().tolist()) == {0.0, 2.0}
    nan = cpu_kernels.masked_scale(torch.full((64,), float("nan"), dtype=torch.bfloat16), 7, 0, 1.0)
    assert nan.isnan().all()


def reference(logits: torch.Tensor, targets: torch.Tensor):
    exact = logits.float()
    losses = torch.nn.functional.cross_entropy(exact, targets, reduction="none")
    grad = torch.softmax(exact, -1)
    valid = targets != -100
    grad[valid.nonzero().squeeze(1), targets[valid]] -= 1.0
    grad[~valid] = 0.0
    return losses, grad


def test_softmax_xent_float32_matches_torch(built):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 1001, generator=g) * 4
    targets = torch.randint(0, 1001, (37,), generator=g)
    targets[[3, 20]] = -100
    want_losses, want_grad = reference(logits, targets)
    grad = torch.full_like(logits, 9.0)
    losses = cpu_kernels.softmax_xent(logits, targets, grad)
    assert torch.allclose(losses, want_losses, rtol=1e-6, atol=1e-6)
    assert losses[3] == 0 and losses[20] == 0
    assert torch.allclose(grad, want_grad, atol=1e-7, rtol=1e-5)
    assert torch.equal(grad[3], torch.zeros(1001))
    columns = logits.t().contiguous().t()  # the same values, a row's not contiguous
    assert cpu_kernels.takes_logits(logits, grad) and not cpu_kernels.takes_logits(columns, None)
    with pytest.raises(ValueError, match="rows of contiguous values"):
        cpu_kernels.softmax_xent(columns, targets, None)
    untouched = logits.clone()
    assert torch.equal(cpu_kernels.softmax_xent(logits, targets, None), losses)  # loss only
    assert torch.equal(logits, untouched)


def test_softmax_xent_bfloat16_in_place_within_one_rounding(built):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(16, 5000, generator=g) * 3).bfloat16()
    targets = torch.randint(0, 5000, (16,), generator=g)
    want_losses, want_grad = reference(logits, targets)
    buffer = logits.clone()
    losses = cpu_kernels.softmax_xent(buffer, targets, buffer)
    assert torch.allclose(losses, want_losses, rtol=1e-6)
    assert buffer.dtype == torch.bfloat16
    # The gradient is rounded to bfloat16 once: within 2**-8 of its size, never more.
    assert torch.allclose(buffer.float(), want_grad, rtol=2**-8, atol=1e-12)
    assert (buffer.float() != want_grad.bfloat16().float()).float().mean() < 0.01


def test_softmax_xent_names_a_row_with_a_target_outside_the_vocabulary(built):
    logits = torch.zeros(4, 10)
    with pytest.raises(IndexError, match="target 10 of row 2 is outside a vocabulary of 10"):
        cpu_kernels.softmax_xent(logits, torch.tensor([0, 1, 10, -100]), None)
    nan = torch.zeros(2, 10)
    nan[1, 4] = float("nan")
    assert cpu_kernels.softmax_xent(nan, torch.tensor([0, 0]), None)[1].isnan()


def test_switched_off_or_without_a_compiler_it_is_none(monkeypatch, tmp_path, caplog):
    cpu_kernels.kernels.cache_clear()
    monkeypatch.setenv("LLAMA_SFT_CPU_KERNELS", "0")
    assert cpu_kernels.kernels() is None and not cpu_kernels.supports(torch.zeros(1))
    cpu_kernels.kernels.cache_clear()
    monkeypatch.delenv("LLAMA_SFT_CPU_KERNELS")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LLAMA_SFT_KERNEL_DIR", str(tmp_path / "kernels"))
    with caplog.at_level(logging.WARNING, logger="llama_sft"):
        assert cpu_kernels.kernels() is None
    assert "CPU kernels unavailable" in caplog.text
    cpu_kernels.kernels.cache_clear()


def test_built_once_per_source_and_flags_into_the_cache_folder(built, tmp_path):
    first = cpu_kernels._build(tmp_path, cpu_kernels.FLAGS)
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels._build(tmp_path, cpu_kernels.FLAGS) == first and first.stat().st_mtime_ns == stamp
    assert cpu_kernels._build(tmp_path, cpu_kernels.SERIAL_FLAGS) != first
