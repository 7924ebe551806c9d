"""SftTrainer's loss: the standard mean token cross-entropy over the labelled tokens of the global batch."""

import os
from types import SimpleNamespace

import pytest
import torch

from llama_sft.data.collate import Collator
from llama_sft.data.packing import PackingCollator
from llama_sft.speedups.autocast import OwnAutocast, keep_residual_in_base_dtype
from llama_sft.speedups.fused_head import (
    ComputeDtypeCopy,
    HeadSkippingEmptyInput,
    LabelledCrossEntropy,
    LabelledHeadCrossEntropy,
    LabelledLoss,
    ce_chunk_rows,
    cross_entropy_chunks,
    head_loss_sum,
    head_projection,
    labelled_loss_sum,
)
from llama_sft.speedups.kept_memory import (
    KEPT_ROWS_SLACK,
    EmbeddingWithKeptGradient,
    HeadMemory,
    keep_embedding_gradients,
)
from llama_sft.speedups.memory import ReturnFreedMemory
from llama_sft.tools.demo import make_model
from llama_sft.training.args import LoraArguments
from llama_sft.training.model import attach_lora
from llama_sft.training.trainer import SftTrainer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 97


def examples(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, prompt in spec:
        ids = [1] + torch.randint(3, VOCAB, (n - 1,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    make_model(path, VOCAB, hidden=64, layers=2, heads=4)
    return path


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa")


def test_cross_entropy_and_gradient_match_torch(ops_path):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (300,), generator=g)
    targets[::7] = -100
    targets[32:48] = -100  # a whole chunk of ignored rows
    ours = LabelledCrossEntropy.apply(logits, targets)
    (grad,) = torch.autograd.grad(ours * 0.25, logits)
    ref = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref * 0.25, logits)
    assert torch.allclose(ours, ref, rtol=1e-6)
    assert torch.allclose(grad, ref_grad, atol=1e-6)
    assert grad[32:48].abs().sum() == 0


def test_cross_entropy_in_one_gpu_sized_chunk_matches_torch(monkeypatch):
    # On a GPU the torch ops take every row of a 55,296-row vocabulary's step in one chunk.
    assert ce_chunk_rows("cuda", 55296) == 1213 and ce_chunk_rows("cpu", 55296) == 16
    monkeypatch.setattr("llama_sft.speedups.fused_head.cpu_kernels.takes_logits", lambda logits, grad: False)
    monkeypatch.setattr("llama_sft.speedups.fused_head.CE_CHUNK_ROWS", 1000)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 50, generator=g)
    targets = torch.randint(0, 50, (300,), generator=g)
    targets[::3] = -100
    grad = torch.full_like(logits, float("nan"))
    total = cross_entropy_chunks(logits, targets, grad)
    exact = logits.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(exact, targets, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, exact)
    assert torch.allclose(total, ref, rtol=1e-6)
    assert torch.allclose(grad, ref_grad, atol=1e-6)
    assert grad[::3].abs().sum() == 0


def test_cross_entropy_of_bfloat16_logits_keeps_their_dtype(ops_path):
    g = torch.Generator().manual_seed(1)
    full = torch.randn(40, 1000, generator=g) * 3
    logits = full.bfloat16().requires_grad_()
    targets = torch.randint(0, 1000, (40,), generator=g)
    ours = LabelledCrossEntropy.apply(logits, targets)
    (grad,) = torch.autograd.grad(ours / 40, logits)
    exact = logits.detach().float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(exact, targets)
    (ref_grad,) = torch.autograd.grad(ref, exact)
    assert ours.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert abs(ours.item() / 40 - ref.item()) < 1e-5
    # Rounded to bfloat16 twice (the gradient, then scaled by 1/40), each within 2**-9 of its size.
    assert torch.allclose(grad.float(), ref_grad, rtol=2**-7, atol=0)


def test_loss_equals_model_loss_on_padded_and_packed_batches(folder):
    model = load(folder).eval()
    records = examples([(20, 8), (11, 4), (33, 30), (6, 2)])
    with torch.no_grad():
        padded = Collator(0)(records)
        reference = model(**padded, use_cache=False).loss
        total, count, _ = labelled_loss_sum(model, padded)
        assert abs((total / count).item() - reference.item()) < 1e-5
        total, count, _ = labelled_loss_sum(model, PackingCollator()(records))
        assert abs((total / count).item() - reference.item()) < 1e-5


def trainer_for(model, tmp_path, **kwargs):
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4
    )
    return SftTrainer(model=model, args=args, **kwargs)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("component", [False, True])
def test_accumulated_pieces_give_the_global_batch_gradient(folder, tmp_path, component):
    """Micro-batches (or token-budget pieces) normalised by the global labelled count sum to the
    gradient of the mean loss over the whole batch, as one pass computes it."""
    records = examples([(20, 8), (11, 4), (33, 10), (6, 2), (15, 5)], seed=3)
    reference_model = load(folder)
    padded = Collator(0)(records)
    reference_model(**padded, use_cache=False).loss.backward()
    expected = grads(reference_model)

    model = load(folder)
    loss = LabelledLoss(head_projection(model)) if component else None  # else the model's own loss
    trainer = trainer_for(model, tmp_path, max_tokens_per_pass=40, loss=loss)
    batch = PackingCollator()(records)
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    loss = trainer.training_step(model, batch, num_items)  # 85 tokens in pieces of at most 40
    got = grads(model)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.allclose(got[name], value, atol=1e-5), name
    assert abs(loss.item() - reference_model(**padded, use_cache=False).loss.item()) < 1e-5


def test_trainer_keeps_vocabulary_gradients_in_the_same_memory_with_the_same_values(folder, tmp_path):
    """On a CPU under bfloat16 autocast, the trained lm_head's and embedding's gradients land in
    kept memory (``kept_gradients``), over two micro-batches a step and from step to step, with
    the values of PyTorch's own new gradients."""
    steps = [PackingCollator()(examples([(20, 8), (11, 4), (33, 10), (6, 2)], seed=s)) for s in (7, 8)]
    results = {}
    for kept in (True, False):
        model = lora_model(folder)
        memory = HeadMemory() if kept else None
        if kept:
            keep_embedding_gradients(model, memory.logits)
        loss = LabelledLoss(head_projection(model), torch.bfloat16, memory)
        autocast = OwnAutocast(model, "cpu", torch.bfloat16)
        trainer = trainer_for(model, tmp_path, max_tokens_per_pass=40, loss=loss, autocast=autocast)
        head = model.get_output_embeddings().modules_to_save["default"]
        embedding = model.get_input_embeddings().modules_to_save["default"]
        assert type(head) is HeadSkippingEmptyInput
        assert type(embedding) is (EmbeddingWithKeptGradient if kept else torch.nn.Embedding)
        results[kept] = []
        for batch in steps:
            num_items = int((batch["labels"][:, 1:] != -100).sum())
            trainer.training_step(model, batch, num_items)  # 70 tokens in pieces of at most 40
            results[kept].append(grads(model))
            if kept:  # the embedding's gradient in the logits' buffer, lent for the step
                assert embedding.weight.grad.data_ptr() == memory.logits.buffer.data_ptr()
                assert head.weight.grad.data_ptr() == memory.grad.buffer.data_ptr()
            model.zero_grad()
    for with_kept, without in zip(results[True], results[False], strict=True):
        assert with_kept.keys() == without.keys()
        for name, value in without.items():
            assert torch.allclose(with_kept[name], value, rtol=0, atol=1e-7), name


def test_cross_entropy_without_grad_gives_the_same_loss(ops_path):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(50, 30, generator=g)
    targets = torch.randint(0, 30, (50,), generator=g)
    targets[:5] = -100
    with torch.no_grad():
        loss = LabelledCrossEntropy.apply(logits, targets)
    ref = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    assert torch.allclose(loss, ref, rtol=1e-6)


def test_fused_head_loss_and_gradients_match_torch(ops_path):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(70, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (70,), generator=g)
    targets[::5] = -100
    targets[16:32] = -100  # a whole chunk of ignored rows
    ours = LabelledHeadCrossEntropy.apply(hidden, weight, targets)
    got = torch.autograd.grad(ours * 0.5, (hidden, weight))
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    expected = torch.autograd.grad(ref * 0.5, (hidden, weight))
    assert torch.allclose(ours, ref, rtol=1e-6)
    for mine, theirs in zip(got, expected, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(head_loss_sum(hidden, weight, targets), ref, rtol=1e-6)


def test_fused_head_evaluates_in_blocks_of_rows(monkeypatch):
    g = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(70, 16, generator=g), torch.randn(40, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (70,), generator=g)
    targets[:9] = -100
    made = []
    monkeypatch.setattr("llama_sft.speedups.fused_head.EVAL_ROWS", 32)
    monkeypatch.setattr(
        "llama_sft.speedups.fused_head.F.linear", lambda x, w: made.append(len(x)) or x @ w.t()
    )
    # A trained weight still requires grad in evaluation; without grad mode no gradient is made.
    with torch.no_grad():
        loss = head_loss_sum(hidden, weight, targets)
    assert made == [32, 32, 6]
    ref = torch.nn.functional.cross_entropy(hidden @ weight.detach().t(), targets, reduction="sum")
    assert torch.allclose(loss, ref, rtol=1e-6)
    made.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training under autocast: every row at once
        head_loss_sum(hidden, weight, targets)
    assert made == [70]


def test_float32_head_trains_in_blocks_of_rows_with_the_loss_and_gradients_of_one_product(
    monkeypatch, ops_path
):
    """Every product in the weight's dtype: the rows go HEAD_BLOCK_ROWS at a time (here 32; rows
    32-63 all ignored), only a block of logits is held in kept memory, and the loss and both
    gradients are those of one product over every row. No labelled row gives a zero loss."""
    monkeypatch.setattr("llama_sft.speedups.fused_head.HEAD_BLOCK_ROWS", 32)
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(70, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (70,), generator=g)
    targets[32:64] = -100
    targets[::7] = -100
    kept = HeadMemory()
    ours = head_loss_sum(hidden, weight, targets, None, kept)
    got = torch.autograd.grad(ours * 0.5, (hidden, weight))
    assert kept.logits.buffer.numel() == (32 + KEPT_ROWS_SLACK) * 40 * 4  # one block of float32 rows
    assert got[1].data_ptr() == kept.grad.buffer.data_ptr()
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    expected = torch.autograd.grad(ref * 0.5, (hidden, weight))
    assert torch.allclose(ours, ref, rtol=1e-6)
    for mine, theirs in zip(got, expected, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-6)
    empty = head_loss_sum(hidden[:0], weight, targets[:0])
    assert float(empty) == 0.0
    assert torch.equal(torch.autograd.grad(empty, weight)[0], torch.zeros_like(weight))


def test_fused_head_with_a_kept_bfloat16_copy_equals_autocast_and_reuses_it():
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(48, 32, generator=g).bfloat16()
    weight = torch.randn(300, 32, generator=g, requires_grad=True)
    targets = torch.randint(0, 300, (48,), generator=g)
    copy = ComputeDtypeCopy()
    results = []
    for low in (None, copy(weight, torch.bfloat16)):
        x = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = LabelledHeadCrossEntropy.apply(x, weight, targets, low)
        results.append((loss, *torch.autograd.grad(loss / 48, (x, weight))))
    for with_autocast, with_copy in zip(*results, strict=True):
        assert with_copy.dtype == with_autocast.dtype and torch.equal(with_copy, with_autocast)
    # The buffer took the weight gradient's product, and the next call copies the weight again.
    buffer = copy.buffer
    assert not torch.equal(buffer, weight.detach().bfloat16())
    assert copy(weight, torch.bfloat16) is buffer and torch.equal(buffer, weight.detach().bfloat16())
    with torch.no_grad():  # evaluation reads it and leaves it
        head_loss_sum(hidden, weight, targets, buffer)
    assert torch.equal(buffer, weight.detach().bfloat16())


def test_fused_head_under_bfloat16_autocast_keeps_float32_weight_gradient():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(48, 32, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(300, 32, generator=g, requires_grad=True)
    targets = torch.randint(0, 300, (48,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = LabelledHeadCrossEntropy.apply(hidden, weight, targets)
    grad_hidden, grad_weight = torch.autograd.grad(ours / 48, (hidden, weight))
    exact_hidden = hidden.detach().float().requires_grad_()
    exact_weight = weight.detach().bfloat16().float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(exact_hidden @ exact_weight.t(), targets)
    ref_hidden, ref_weight = torch.autograd.grad(ref, (exact_hidden, exact_weight))
    assert grad_hidden.dtype == torch.bfloat16 and grad_weight.dtype == torch.float32
    # bfloat16 logits (8 bits of mantissa) against float32 ones.
    assert abs(ours.item() / 48 - ref.item()) < 0.02
    assert (grad_weight - ref_weight).abs().max() < 0.02 * ref_weight.abs().max()
    assert (grad_hidden.float() - ref_hidden).abs().max() < 0.02 * ref_hidden.abs().max()


def lora_model(folder, modules_to_save="embed_tokens,lm_head", trainable="q_proj,v_proj"):
    torch.manual_seed(0)
    lora = LoraArguments(
        trainable=trainable, lora_rank=4, lora_alpha=8, lora_dropout=0.0, modules_to_save=modules_to_save
    )
    return attach_lora(load(folder), lora)


def test_head_projection_is_the_trained_copy_or_none(folder):
    model = lora_model(folder)
    trained = model.get_output_embeddings().modules_to_save["default"]
    assert head_projection(model) is trained and trained.weight.requires_grad
    assert head_projection(lora_model(folder, modules_to_save="null")).weight.requires_grad is False
    lora_head = lora_model(folder, modules_to_save="embed_tokens", trainable="q_proj,lm_head")
    assert head_projection(lora_head) is None
    model.config.model_type = "gemma2"  # its logits are soft-capped after the projection
    assert head_projection(model) is None


def test_embedding_gradients_are_kept_for_the_trained_copy_only(folder):
    model = lora_model(folder)
    keys = set(model.state_dict())
    assert keep_embedding_gradients(model) == 1
    wrapper = model.get_input_embeddings()
    assert type(wrapper.modules_to_save["default"]) is EmbeddingWithKeptGradient
    assert type(wrapper.original_module) is torch.nn.Embedding
    assert set(model.state_dict()) == keys
    assert keep_embedding_gradients(lora_model(folder, modules_to_save="lm_head")) == 0


def test_fused_and_unfused_paths_give_the_same_loss_and_gradients(folder):
    records = examples([(20, 8), (11, 4), (33, 10), (6, 2)], seed=5)
    batch = PackingCollator()(records)
    results = []
    for fused in (True, False):
        model = lora_model(folder)
        total, count, _ = labelled_loss_sum(model, batch, head_projection(model).weight if fused else None)
        (total / count).backward()
        results.append((total.item(), grads(model)))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    assert abs(fused_loss - plain_loss) < 1e-4
    assert fused_grads.keys() == plain_grads.keys() and any("lm_head" in k for k in fused_grads)
    for name, value in plain_grads.items():
        assert torch.allclose(fused_grads[name], value, atol=1e-6), name


def test_cpu_kernels_and_torch_ops_train_the_same(folder, monkeypatch):
    from llama_sft.speedups import cpu_kernels

    if cpu_kernels.kernels() is None:
        pytest.skip("the CPU kernels cannot be built here (no C compiler?)")
    batch = PackingCollator()(examples([(20, 8), (11, 4), (33, 10), (6, 2)], seed=6))
    results = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("LLAMA_SFT_CPU_KERNELS", switch)
        cpu_kernels.kernels.cache_clear()
        model = lora_model(folder)
        total, count, _ = labelled_loss_sum(model, batch, head_projection(model).weight)
        (total / count).backward()
        results[switch] = (total.item(), grads(model))
    cpu_kernels.kernels.cache_clear()
    (kernel_loss, kernel_grads), (torch_loss, torch_grads) = results["1"], results["0"]
    assert abs(kernel_loss - torch_loss) < 1e-4
    assert kernel_grads.keys() == torch_grads.keys() and any("lm_head" in k for k in kernel_grads)
    for name, value in torch_grads.items():
        assert torch.allclose(kernel_grads[name], value, atol=1e-6), name


def test_bfloat16_base_runs_its_residual_in_bfloat16_under_autocast(folder):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    lora = LoraArguments(trainable="q_proj", lora_rank=4, modules_to_save="embed_tokens,lm_head")
    model = attach_lora(base, lora)
    assert model.get_input_embeddings().modules_to_save["default"].weight.dtype == torch.float32
    ids = torch.tensor([[1, 5, 9, 4]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert keep_residual_in_base_dtype(model) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert before[0].dtype == torch.float32 and all(h.dtype == torch.bfloat16 for h in after)
    # Without autocast the float32 copy's output is left alone.
    assert model.get_input_embeddings()(ids).dtype == torch.float32
    assert keep_residual_in_base_dtype(lora_model(folder)) is None  # a float32 base


@pytest.mark.parametrize("under_bf16_autocast, trimmed", [(True, [8, 16]), (False, list(range(1, 18)))])
def test_freed_memory_is_returned_every_eighth_step_under_bf16_every_step_in_float32(
    monkeypatch, under_bf16_autocast, trimmed
):
    callback = ReturnFreedMemory(under_bf16_autocast)
    if callback.trim is None:
        pytest.skip("this C library has no malloc_trim (not glibc)")
    calls = []
    monkeypatch.setattr(callback, "trim", lambda pad: calls.append(pad) or 1)
    trimmed_at = []
    for step in range(1, 18):
        before = len(calls)
        callback.on_step_end(None, SimpleNamespace(global_step=step), None)
        if len(calls) > before:
            trimmed_at.append(step)
    assert trimmed_at == trimmed and set(calls) == {0}
    real = ReturnFreedMemory(under_bf16_autocast).trim
    assert real(0) in (0, 1)  # the real call: 1 when memory was released
