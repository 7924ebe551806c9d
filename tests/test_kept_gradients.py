import os

import torch

from llama_sft.speedups.fused_head import ComputeDtypeCopy, HeadSkippingEmptyInput, head_loss_sum
from llama_sft.speedups.kept_memory import (
    KEPT_ROWS_SLACK,
    EmbeddingWithKeptGradient,
    HeadMemory,
    KeptGradient,
    KeptRows,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def integer_grads(shape, seed):
    """Small integers: sums of them are exact in any order, so gradients compare with equality."""
    return torch.randint(-4, 5, shape, generator=torch.Generator().manual_seed(seed)).float()


def embedding_pair():
    torch.manual_seed(0)
    reference = torch.nn.Embedding(10, 4, padding_idx=2)
    ours = torch.nn.Embedding(10, 4, padding_idx=2)
    ours.load_state_dict(reference.state_dict())
    ours.__class__ = EmbeddingWithKeptGradient
    ours.kept = KeptGradient()
    return reference, ours


def test_embedding_gradient_equals_torch_in_the_kept_memory_across_steps():
    reference, ours = embedding_pair()
    steps = [
        # ids with repeats and the padding id 2, one micro-batch; then two micro-batches
        [torch.tensor([[1, 2, 3, 1], [2, 7, 1, 0]])],
        [torch.tensor([[5, 5, 2]]), torch.tensor([[9, 1, 5]])],
    ]
    seed = 0
    for micro_batches in steps:
        reference.weight.grad = ours.weight.grad = None  # as the Trainer does after each step
        for ids in micro_batches:
            seed += 1
            out_grad = integer_grads((*ids.shape, 4), seed)
            reference(ids).backward(out_grad)
            ours(ids).backward(out_grad)
        assert torch.equal(ours.weight.grad, reference.weight.grad)
        assert ours.weight.grad[2].abs().sum() == 0 and ours.weight.grad.abs().sum() > 0
        # The gradient lives in the kept buffer, the same memory every step, even after a second
        # micro-batch was added to it.
        assert ours.weight.grad.data_ptr() == ours.kept.buffer.data_ptr()
        if micro_batches is steps[0]:
            first_memory = ours.kept.buffer.data_ptr()
    assert ours.kept.buffer.data_ptr() == first_memory
    # The second step's gradient started from zero, not from the first step's.
    assert ours.weight.grad[3].abs().sum() == 0


def test_embedding_takes_torch_path_where_the_kept_one_does_not_apply():
    reference, ours = embedding_pair()
    ids = torch.tensor([[1, 2, 3, 1]])
    assert type(ours(ids).grad_fn).__name__ == "_EmbeddingKeptGradientBackward"
    # An option the kept gradient does not implement: nn.Embedding's own backward, same gradient.
    reference.scale_grad_by_freq = ours.scale_grad_by_freq = True
    out_grad = integer_grads((1, 4, 4), 9)
    out = ours(ids)
    assert type(out.grad_fn).__name__ == "EmbeddingBackward0"
    out.backward(out_grad)
    reference(ids).backward(out_grad)
    assert torch.equal(ours.weight.grad, reference.weight.grad) and ours.kept.buffer is None
    with torch.no_grad():
        assert torch.equal(ours(ids), reference(ids)) and ours(ids).grad_fn is None


def test_kept_gradient_takes_memory_only_while_there_is_no_gradient():
    kept, param = KeptGradient(), torch.nn.Parameter(torch.zeros(3, 2))
    first = kept.take(param)
    assert first.shape == (3, 2) and first.data_ptr() == kept.buffer.data_ptr()
    assert first is not kept.buffer  # a new tensor object, which autograd may adopt as the gradient
    param.grad = first
    assert kept.take(param) is None
    param.grad = None
    assert kept.take(param).data_ptr() == first.data_ptr()


def test_head_runs_an_empty_product_without_autocast():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 30, bias=False)
    head.__class__ = HeadSkippingEmptyInput
    with torch.autocast("cpu", dtype=torch.bfloat16):
        empty = head(torch.randn(1, 0, 8))
    # float32 under bfloat16 autocast: autocast did not apply, so the weight was not cast.
    assert empty.shape == (1, 0, 30) and empty.dtype == torch.float32
    assert empty.grad_fn is not None  # the weight stays in the graph of the model's outputs
    x = torch.randn(1, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = head(x)
        assert full.dtype == torch.bfloat16 and torch.equal(full, torch.nn.functional.linear(x, head.weight))


def test_fused_head_makes_its_logits_and_casts_its_weight_gradient_into_kept_memory(ops_path):
    """Micro-batches of 48 then 20 labelled rows, over two steps: the same loss and gradients as
    with new tensors, the logits in one buffer throughout and the weight gradient in another."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(48, 32, generator=g).bfloat16()
    targets = torch.randint(0, 300, (48,), generator=g)
    targets[::7] = -100
    start = torch.randn(300, 32, generator=g)
    weights = {name: torch.nn.Parameter(start.clone()) for name in ("new", "kept")}
    kept, copy = HeadMemory(), ComputeDtypeCopy()
    buffers = set()
    for _step in range(2):
        for rows in (48, 20):
            losses = {}
            for name, weight in weights.items():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    low = copy(weight, torch.bfloat16)
                    memory = kept if name == "kept" else None
                    losses[name] = head_loss_sum(hidden[:rows], weight, targets[:rows], low, memory)
                (losses[name] / 48).backward()
            assert torch.equal(losses["kept"], losses["new"])
            assert kept.logits.buffer.numel() == (48 + KEPT_ROWS_SLACK) * 300 * 2  # bytes
            buffers.add(kept.logits.buffer.data_ptr())
        assert torch.equal(weights["kept"].grad, weights["new"].grad)
        assert weights["kept"].grad.data_ptr() == kept.grad.buffer.data_ptr() and len(buffers) == 1
        for weight in weights.values():
            weight.grad = None
    # Under autocast without a compute-dtype copy the products' dtype is autocast's: nothing is kept.
    unkept = HeadMemory()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        head_loss_sum(hidden.float(), weights["kept"], targets, None, unkept).backward()
    assert unkept.grad.buffer is None and unkept.logits.buffer is None and weights["kept"].grad is not None


def test_in_float32_the_fused_head_makes_its_logits_and_weight_gradient_in_kept_memory(ops_path):
    """Float32 training (the default on a CPU without bfloat16 units), no compute-dtype copy:
    the logits and the weight's gradient product go straight into kept memory, over micro-batches
    of 48 then 20 rows and two steps, with the loss and gradients of new tensors."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(48, 32, generator=g)
    targets = torch.randint(0, 300, (48,), generator=g)
    targets[::5] = -100
    start = torch.randn(300, 32, generator=g)
    weights = {name: torch.nn.Parameter(start.clone()) for name in ("new", "kept")}
    kept = HeadMemory()
    for _step in range(2):
        for rows in (48, 20):
            losses = {}
            for name, weight in weights.items():
                memory = kept if name == "kept" else None
                losses[name] = head_loss_sum(hidden[:rows], weight, targets[:rows], None, memory)
                (losses[name] / 48).backward()
            assert torch.allclose(losses["kept"], losses["new"], rtol=1e-6)
            assert kept.logits.buffer.numel() == (48 + KEPT_ROWS_SLACK) * 300 * 4  # float32 bytes
        assert torch.allclose(weights["kept"].grad, weights["new"].grad, rtol=1e-5, atol=1e-7)
        assert weights["kept"].grad.data_ptr() == kept.grad.buffer.data_ptr()
        for weight in weights.values():
            weight.grad = None


def test_kept_rows_grow_only_when_more_rows_are_needed():
    rows = KeptRows()
    first = rows.take(10, 4, torch.bfloat16)
    assert first.shape == (10, 4) and rows.buffer.numel() == (10 + KEPT_ROWS_SLACK) * 4 * 2
    buffer = rows.buffer
    assert rows.take(10 + KEPT_ROWS_SLACK, 4, torch.bfloat16).data_ptr() == buffer.data_ptr()
    assert rows.take(3, 4, torch.bfloat16).shape == (3, 4) and rows.buffer is buffer
    assert rows.take(5 + KEPT_ROWS_SLACK // 2, 4, torch.float32).data_ptr() == buffer.data_ptr()
    grown = rows.take(11 + KEPT_ROWS_SLACK, 4, torch.bfloat16)
    assert grown.shape == (11 + KEPT_ROWS_SLACK, 4) and rows.buffer is not buffer


def test_a_gradient_lent_the_rows_buffer_keeps_it_until_it_is_dropped():
    rows = KeptRows()
    rows.take(2, 3, torch.bfloat16)  # (2 + 256) x 3 x 2 bytes: too small for the gradient
    param = torch.nn.Parameter(torch.zeros(100, 8))
    kept = KeptGradient(rows)
    grad = kept.take(param)
    assert grad.shape == (100, 8) and grad.dtype == torch.float32
    assert grad.data_ptr() == rows.buffer.data_ptr() and rows.buffer.numel() == 100 * 8 * 4
    param.grad = grad.fill_(1.0)
    assert kept.take(param) is None
    logits = rows.take(8, 3, torch.bfloat16).fill_(5.0)  # while the gradient lives: new memory
    assert logits.data_ptr() != rows.buffer.data_ptr() and torch.equal(param.grad, torch.ones(100, 8))
    param.grad = None
    assert rows.take(8, 3, torch.bfloat16).data_ptr() == rows.buffer.data_ptr()
    assert kept.buffer is None  # nothing of its own
