"""SftTrainer's loss: the standard mean token cross-entropy over the labelled tokens of the global batch."""

import os

import pytest
import torch

from llama_sft.collate import Collator
from llama_sft.demo import make_model
from llama_sft.packing import PackingCollator
from llama_sft.trainer import LabelledCrossEntropy, SftTrainer, labelled_loss_sum

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


def test_cross_entropy_and_gradient_match_torch():
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


def test_cross_entropy_of_bfloat16_logits_keeps_their_dtype():
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


def test_accumulated_pieces_give_the_global_batch_gradient(folder, tmp_path):
    """Micro-batches (or token-budget pieces) normalised by the global labelled count sum to the
    gradient of the mean loss over the whole batch, as one pass computes it."""
    records = examples([(20, 8), (11, 4), (33, 10), (6, 2), (15, 5)], seed=3)
    reference_model = load(folder)
    padded = Collator(0)(records)
    reference_model(**padded, use_cache=False).loss.backward()
    expected = grads(reference_model)

    model = load(folder)
    trainer = trainer_for(model, tmp_path, max_tokens_per_pass=40)
    batch = PackingCollator()(records)
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    loss = trainer.training_step(model, batch, num_items)  # 85 tokens in pieces of at most 40
    got = grads(model)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.allclose(got[name], value, atol=1e-5), name
    assert abs(loss.item() - reference_model(**padded, use_cache=False).loss.item()) < 1e-5


def test_cross_entropy_without_grad_gives_the_same_loss():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(50, 30, generator=g)
    targets = torch.randint(0, 30, (50,), generator=g)
    targets[:5] = -100
    with torch.no_grad():
        loss = LabelledCrossEntropy.apply(logits, targets)
    ref = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    assert torch.allclose(loss, ref, rtol=1e-6)
