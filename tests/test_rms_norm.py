"""FusedRMSNorm: transformers' LlamaRMSNorm in one CPU kernel, and its swap into a model."""

import importlib
import inspect

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from llama_sft import cpu_kernels
from llama_sft.rms_norm import LLAMA_RMS_NORMS, FusedRMSNorm, use_fused_rms_norm


def reference_and_fused(dtype, width=48, eps=1e-5):
    torch.manual_seed(0)
    reference = LlamaRMSNorm(width, eps=eps).to(dtype)
    reference.weight.data = (torch.randn(width) * 0.3 + 1).to(dtype)
    reference.weight.requires_grad_(False)
    return reference, FusedRMSNorm(reference.weight, eps)


def forward_backward(norm, x, grad):
    x = x.clone().requires_grad_()
    out = norm(x)
    out.backward(grad)
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["kernels", "torch"])
def test_equals_llama_rms_norm_and_its_input_gradient(dtype, path, monkeypatch):
    if path == "torch":
        monkeypatch.setattr(cpu_kernels, "supports", lambda *tensors: False)
    elif cpu_kernels.kernels() is None:
        pytest.skip("the CPU kernels cannot be built here (no C compiler?)")
    reference, fused = reference_and_fused(dtype)
    x = (torch.randn(2, 37, 48) * 4).to(dtype)  # rows of very different scales
    x[0, 3] *= 1e-3
    grad = torch.randn(2, 37, 48).to(dtype)
    want, want_grad = forward_backward(reference, x, grad)
    got, got_grad = forward_backward(fused, x, grad)
    assert got.dtype == dtype and got_grad.dtype == dtype
    if dtype == torch.bfloat16:
        # The row's float32 mean of squares is summed in another order; after rounding to bfloat16
        # the values agree exactly here, and the gradient within one rounding.
        assert torch.equal(got, want)
        torch.testing.assert_close(got_grad, want_grad, rtol=2**-7, atol=1e-3)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_kernel_keeps_the_input_and_a_float_per_row(monkeypatch):
    if cpu_kernels.kernels() is None:
        pytest.skip("the CPU kernels cannot be built here (no C compiler?)")
    _, fused = reference_and_fused(torch.bfloat16)
    x = torch.randn(3, 10, 48, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused(x)
    assert [tuple(t.shape) for t in saved] == [(3, 10, 48), (48,), (30,)]
    assert saved[0] is x and saved[2].dtype == torch.float32


def test_trained_weight_or_mixed_dtypes_take_the_reference_formula():
    reference, fused = reference_and_fused(torch.float32)
    x = torch.randn(5, 48)
    fused.weight.requires_grad_(True)
    out = fused(x)
    out.sum().backward()
    assert fused.weight.grad is not None and fused.weight.grad.abs().sum() > 0
    torch.testing.assert_close(out, reference(x))
    assert fused(x.bfloat16()).dtype == torch.float32  # promoted, as LlamaRMSNorm does


def test_listed_norm_classes_have_llama_forward():
    modules = {
        "MistralRMSNorm": "mistral",
        "MixtralRMSNorm": "mixtral",
        "Qwen2RMSNorm": "qwen2",
        "Qwen2MoeRMSNorm": "qwen2_moe",
        "Qwen3RMSNorm": "qwen3",
    }
    assert set(modules) == LLAMA_RMS_NORMS - {"LlamaRMSNorm"}
    llama = inspect.getsource(LlamaRMSNorm.forward)
    for name, folder in modules.items():
        module = importlib.import_module(f"transformers.models.{folder}.modeling_{folder}")
        assert inspect.getsource(getattr(module, name).forward) == llama, name


def test_swapped_into_a_model_with_the_same_weights_and_outputs(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    model.requires_grad_(False)
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    want = model(input_ids=ids).logits
    keys = list(model.state_dict())
    layers = model.config.num_hidden_layers
    assert use_fused_rms_norm(model) == 2 * layers + 1
    assert list(model.state_dict()) == keys
    norms = [m for m in model.modules() if isinstance(m, FusedRMSNorm)]
    assert len(norms) == 2 * layers + 1 and not any(isinstance(m, LlamaRMSNorm) for m in model.modules())
    # In bfloat16 the norms give the reference's values; a summation order that rounded one of them
    # differently would move a logit by about one bfloat16 step.
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=2e-2)
