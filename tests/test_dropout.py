"""LoRA dropout: the same distribution and gradient as torch's, repeatable from torch's seed."""

import pytest
import torch

from llama_sft.speedups.dropout import BitsDropout, use_bits_dropout
from llama_sft.tools.demo import make_model
from llama_sft.training.args import LoraArguments
from llama_sft.training.model import attach_lora


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_keeps_one_minus_p_scaled_and_masks_the_gradient(p, ops_path):
    torch.manual_seed(0)
    x = torch.randn(1000, 1000).abs() + 0.5  # no zeros, so a zero output means dropped
    x.requires_grad_()
    y = BitsDropout(p).train()(x)
    keep = y != 0
    # 1e6 draws: the kept share's standard deviation is below 5e-4.
    assert abs(keep.float().mean().item() - (1 - p)) < 2e-3
    assert torch.allclose(y[keep], x[keep] / (1 - p))
    (y * 3).sum().backward()
    assert torch.equal(x.grad, keep.float() * 3 / (1 - p))


def test_seeded_by_torch_and_identity_in_eval(ops_path):
    x = torch.randn(64, 128)
    dropout = BitsDropout(0.1).train()
    torch.manual_seed(7)
    first = dropout(x)
    torch.manual_seed(7)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(dropout(x), first)  # the next call draws new bits
    assert torch.equal(dropout.eval()(x), x)
    assert (BitsDropout(0.1).train()(x.bfloat16()) != 0).float().mean() > 0.85


def test_lora_layers_get_it(tmp_path):
    """attach_lora gives PEFT's own dropout; use_bits_dropout swaps each for BitsDropout."""
    from transformers import AutoModelForCausalLM

    make_model(tmp_path, 50, hidden=32, layers=1, heads=2, intermediate=64)
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    model = attach_lora(base, LoraArguments(trainable="q_proj,v_proj,down_proj", lora_dropout=0.05))
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 3 and all(type(m) is torch.nn.Dropout and m.p == 0.05 for m in dropouts)
    assert use_bits_dropout(model) == 3
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 3 and all(type(m) is BitsDropout and m.p == 0.05 for m in dropouts)
