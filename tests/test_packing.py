"""Packing: records back to back in one row, position ids restarting, no attention across records."""

import os

import pytest
import torch

from llama_sft.data.collate import Collator
from llama_sft.data.packing import PackingCollator, record_starts, split_packed
from llama_sft.speedups.attention import PACKED_SDPA
from llama_sft.tools.demo import make_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 97


def examples(lengths_and_prompts, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, prompt in lengths_and_prompts:
        ids = [1] + torch.randint(3, VOCAB, (n - 1,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("model")
    make_model(folder, VOCAB, hidden=64, layers=2, heads=4)
    return AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


def test_collator_packs_without_padding():
    batch = PackingCollator()(examples([(5, 2), (3, 1), (4, 4)]))
    assert batch["input_ids"].shape == (1, 12)
    assert "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]
    labels = batch["labels"][0].tolist()
    assert labels[0] == labels[5] == labels[8] == -100  # each record's first position
    assert record_starts(batch["position_ids"]) == [0, 5, 8, 12]


def test_split_keeps_whole_records_within_budget():
    batch = PackingCollator()(examples([(5, 2), (3, 1), (4, 2), (9, 3)]))
    pieces = split_packed(batch, 8)
    assert [p["input_ids"].shape[1] for p in pieces] == [8, 4, 9]  # 5+3, 4, then a 9-token record alone
    assert torch.equal(torch.cat([p["input_ids"] for p in pieces], dim=1), batch["input_ids"])
    for piece in pieces:
        assert piece["position_ids"][0, 0] == 0
    assert split_packed(batch, None) == [batch]


@pytest.mark.parametrize("attn", ["sdpa", "eager", PACKED_SDPA])
def test_per_record_loss_equals_record_alone(model, attn):
    model.config._attn_implementation = attn
    records = examples([(17, 6), (9, 3), (30, 12), (2, 1)], seed=1)
    batch = PackingCollator()(records)
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
        start = 0
        for record in records:
            n = len(record["input_ids"])
            alone_batch = Collator(0)([record])
            alone = model(**{k: v for k, v in alone_batch.items() if k != "labels"}, use_cache=False).logits[
                0
            ]
            assert torch.allclose(logits[start : start + n], alone, atol=1e-5, rtol=0)
            labels = torch.tensor(record["labels"][1:])
            if (labels != -100).any():
                packed_loss = torch.nn.functional.cross_entropy(logits[start : start + n - 1], labels)
                alone_loss = torch.nn.functional.cross_entropy(alone[:-1], labels)
                assert abs(packed_loss.item() - alone_loss.item()) < 1e-5
            start += n
    model.config._attn_implementation = "sdpa"


def test_packed_attention_runs_record_by_record(model, monkeypatch, ops_path):
    """The packed path is what runs, one causal attention per record (the CPU kernel: one call per
    layer over the row's record starts; without it: one sdpa call per record), and it agrees with
    sdpa's block-diagonal mask on a packed row, on plain rows and on padded rows."""
    import llama_sft.speedups.attention as attention

    records = examples([(17, 6), (9, 3), (30, 12), (2, 1)], seed=2)
    batch = PackingCollator()(records)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    lengths, kernel_starts = [], []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    real_kernel = attention.cpu_kernels.causal_attention

    def counting_sdpa(query, *args, **kwargs):
        lengths.append(query.shape[2])
        return real_sdpa(query, *args, **kwargs)

    def counting_kernel(q, k, v, starts, scale):
        kernel_starts.append(starts.tolist())
        return real_kernel(q, k, v, starts, scale)

    plain = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(plain)
    mask[1, 8:] = 0
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        reference = [model(**inputs).logits, model(input_ids=plain).logits]
        reference.append(model(input_ids=plain, attention_mask=mask).logits)
        model.config._attn_implementation = PACKED_SDPA
        monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counting_sdpa)
        monkeypatch.setattr(attention.cpu_kernels, "causal_attention", counting_kernel)
        packed = model(**inputs).logits
        layers = model.config.num_hidden_layers
        if ops_path == "kernels":
            assert kernel_starts == [[0, 17, 26, 56, 58]] * layers and lengths == []
        else:
            assert lengths == [17, 9, 30, 2] * layers and kernel_starts == []
        assert torch.allclose(packed, reference[0], atol=1e-5, rtol=0)
        assert torch.allclose(model(input_ids=plain).logits, reference[1], atol=1e-5, rtol=0)
        padded = model(input_ids=plain, attention_mask=mask).logits
        assert torch.allclose(padded[mask.bool()], reference[2][mask.bool()], atol=1e-5, rtol=0)
    model.config._attn_implementation = "sdpa"


def test_block_causal_mask_of_a_packed_row():
    from llama_sft.speedups.attention import forward_block_causal_mask

    mask = forward_block_causal_mask(torch.tensor([[0, 1, 2, 0, 1]]), torch.bfloat16)
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bfloat16
    assert mask.stride(-2) == 16  # rows aligned for the memory-efficient kernel
    assert set(mask.unique().tolist()) == {0.0, float("-inf")}
    assert (mask[0, 0] == 0).int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]


def test_a_row_attends_at_once_only_off_the_cpu_and_up_to_its_length_limit():
    from llama_sft.speedups.attention import GPU_ROW_AT_ONCE_MAX_LEN, attends_row_at_once

    assert not attends_row_at_once(torch.device("cpu"), 100)
    assert attends_row_at_once(torch.device("cuda"), GPU_ROW_AT_ONCE_MAX_LEN)
    assert not attends_row_at_once(torch.device("cuda"), GPU_ROW_AT_ONCE_MAX_LEN + 1)


def test_row_at_once_equals_record_by_record_forward_and_backward(model, monkeypatch):
    """The GPU's path (one masked sdpa call per layer), run here on the CPU: the same logits and
    the same gradients as record by record, with one sdpa call per layer given the row's mask."""
    import llama_sft.speedups.attention as attention

    records = examples([(17, 6), (9, 3), (30, 12), (2, 1)], seed=5)
    batch = PackingCollator()(records)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    model.config._attn_implementation = PACKED_SDPA
    monkeypatch.setenv("LLAMA_SFT_CPU_KERNELS", "0")
    attention.cpu_kernels.kernels.cache_clear()

    def logits_and_grads():
        model.zero_grad(set_to_none=True)
        logits = model(**inputs).logits
        (logits.float() ** 2).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    with torch.enable_grad():
        by_record, by_record_grads = logits_and_grads()
        masks = []
        real_sdpa = torch.nn.functional.scaled_dot_product_attention

        def counting_sdpa(query, key, value, attn_mask=None, **kwargs):
            masks.append(attn_mask)
            return real_sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

        monkeypatch.setattr(attention, "attends_row_at_once", lambda device, n: True)
        monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counting_sdpa)
        at_once, at_once_grads = logits_and_grads()
    model.zero_grad(set_to_none=True)
    model.config._attn_implementation = "sdpa"
    attention.cpu_kernels.kernels.cache_clear()
    assert len(masks) == model.config.num_hidden_layers
    assert all(m is masks[0] and m.shape == (1, 1, 58, 58) for m in masks)
    assert masks[0][0, 0, 17, 16] == float("-inf") and masks[0][0, 0, 17, 17] == 0  # a new record
    assert torch.allclose(at_once, by_record, atol=1e-5, rtol=0)
    for name, grad in by_record_grads.items():
        assert torch.allclose(at_once_grads[name], grad, atol=1e-5, rtol=1e-4), name


def per_record_sdpa(q, k, v, lengths):
    pieces = [
        torch.nn.functional.scaled_dot_product_attention(
            a, b, c, is_causal=True, enable_gqa=a.shape[1] != b.shape[1]
        )
        for a, b, c in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True)
    ]
    return torch.cat(pieces, 2).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 32), (4, 2, 16), (2, 1, 64)])
def test_packed_attention_kernel_equals_sdpa_forward_and_backward(dtype, heads, kv_heads, head_dim, built):
    """PackedCausalAttention against one sdpa per record, in float32: the output and the three
    gradients, for queries, keys and values laid out as transformers makes them ((1, n, heads,
    head_dim) transposed), with grouped key/value heads and records of 1 to 70 tokens."""
    from llama_sft.speedups.attention import PackedCausalAttention

    lengths = [5, 1, 70, 17, 33]
    n = sum(lengths)
    g = torch.Generator().manual_seed(heads * head_dim)
    q = torch.randn(1, n, heads, head_dim, generator=g).to(dtype).transpose(1, 2)
    k, v = (torch.randn(1, n, kv_heads, head_dim, generator=g).to(dtype).transpose(1, 2) for _ in "kv")
    grad = torch.randn(1, n, heads, head_dim, generator=g).to(dtype)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    truth = [t.float().requires_grad_() for t in (q, k, v)]
    out = PackedCausalAttention.apply(*ours, torch.tensor([0, 5, 6, 76, 93, 126]), head_dim**-0.5)
    out.backward(grad)
    want = per_record_sdpa(*truth, lengths)
    want.backward(grad.float())
    assert out.shape == (1, n, heads, head_dim) and out.dtype == dtype
    pairs = [(out, want)] + [(a.grad, b.grad) for a, b in zip(ours, truth, strict=True)]
    for got, expected in pairs:
        assert got.shape == expected.shape and got.dtype == dtype
        # float32: summation order only; bfloat16: inputs and outputs rounded, float32 inside.
        tolerance = 1e-5 if dtype == torch.float32 else float(expected.abs().max()) / 64
        torch.testing.assert_close(got.float(), expected.detach(), rtol=0, atol=tolerance)


def test_record_starts_are_read_once_per_forward(model, monkeypatch):
    """Reading the starts back from a GPU is a synchronisation: once per forward, not per layer,
    and a new row (even of the same length) gets its own."""
    import llama_sft.speedups.attention as attention

    calls = []
    monkeypatch.setattr(attention, "record_starts", lambda p: calls.append(1) or record_starts(p))
    model.config._attn_implementation = PACKED_SDPA
    first = PackingCollator()(examples([(10, 4), (6, 2)], seed=4))
    second = PackingCollator()(examples([(5, 2), (11, 3)], seed=5))
    with torch.no_grad():
        inputs = [
            {"input_ids": b["input_ids"], "position_ids": b["position_ids"], "use_cache": False}
            for b in (first, second)
        ]
        logits = [model(**row).logits for row in inputs]
        model.config._attn_implementation = "sdpa"
        for row, got in zip(inputs, logits, strict=True):
            expected = model(**row).logits
            assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert model.config.num_hidden_layers == 2 and len(calls) == 2


@pytest.mark.parametrize("long", ["over-math-limit", "over-kernel-limit"])
def test_packed_attention_with_grouped_kv_heads_and_a_long_record(ops_path, long, monkeypatch):
    """Grouped key/value heads (as in LLaMA-2 70B), and a record longer than the CPU math-kernel
    limit (without the CPU kernels it goes to the flash kernel), or longer than the packed CPU
    kernel's (the row goes to sdpa, one call per record): still equal to sdpa with the
    block-diagonal mask."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import llama_sft.speedups.attention as attention
    from llama_sft.speedups.attention import CPU_KERNEL_MAX_LEN, CPU_MATH_MAX_LEN

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    length = CPU_MATH_MAX_LEN + 40 if long == "over-math-limit" else CPU_KERNEL_MAX_LEN + 10
    batch = PackingCollator()(examples([(length, 10), (7, 2), (50, 5)], seed=4))
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    calls = []
    real_kernel = attention.cpu_kernels.causal_attention
    monkeypatch.setattr(
        attention.cpu_kernels, "causal_attention", lambda *a: calls.append(1) or real_kernel(*a)
    )
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        reference = model(**inputs).logits
        model.config._attn_implementation = PACKED_SDPA
        assert torch.allclose(model(**inputs).logits, reference, atol=1e-5, rtol=0)
    kernel_runs = ops_path == "kernels" and long == "over-math-limit"
    assert len(calls) == (config.num_hidden_layers if kernel_runs else 0)
