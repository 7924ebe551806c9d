"""FusedRMSNorm and FusedSwiGLUMLP: transformers' LlamaRMSNorm and LlamaMLP with CPU kernels, and
their swap into a model."""

import importlib
import inspect

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from llama_sft import cpu_kernels
from llama_sft.fused_modules import (
    LLAMA_MLPS,
    LLAMA_RMS_NORMS,
    FusedRMSNorm,
    FusedSwiGLUMLP,
    SwiGLUProduct,
    use_fused_modules,
)


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
def test_equals_llama_rms_norm_and_its_input_gradient(dtype, ops_path):
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


def test_kernel_keeps_the_input_and_a_float_per_row(built):
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_equals_llama_mlp_and_its_gradients(dtype, ops_path):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=24, intermediate_size=40, num_attention_heads=4, hidden_act="silu")
    reference = LlamaMLP(config).to(dtype)
    fused = FusedSwiGLUMLP(reference)
    x = (torch.randn(2, 9, 24) * 3).to(dtype)
    grad = torch.randn(2, 9, 24).to(dtype)
    results = []
    for mlp in (reference, fused):
        mlp.zero_grad()
        got, got_grad = forward_backward(mlp, x, grad)
        results.append((got, got_grad, [p.grad.clone() for p in mlp.parameters()]))
    (want, want_grad, want_params), (got, got_grad, got_params) = results
    tolerance = {"rtol": 2**-7, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(got, want, **tolerance)
    torch.testing.assert_close(got_grad, want_grad, **tolerance)
    for got_param, want_param in zip(got_params, want_params, strict=True):
        torch.testing.assert_close(got_param, want_param, **tolerance)


def test_mlp_kernel_keeps_gate_and_up_only(built):
    gate = torch.randn(3, 7, 40, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(3, 7, 40, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = cpu_kernels.swiglu(gate.detach(), up.detach())
        fused = SwiGLUProduct.apply(gate, up)
    assert torch.equal(fused, out)
    # silu(gate) is rounded to bfloat16 before the product, as LlamaMLP's separate ops round it.
    assert torch.equal(out, (torch.nn.functional.silu(gate.detach()) * up.detach()))
    assert len(saved) == 2 and saved[0] is gate and saved[1] is up


def test_listed_classes_have_llama_forward():
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
    mlps = {"MistralMLP": "mistral", "Qwen2MLP": "qwen2", "Qwen3MLP": "qwen3"}
    assert set(mlps) == LLAMA_MLPS - {"LlamaMLP"}
    llama = inspect.getsource(LlamaMLP.forward)
    for name, folder in mlps.items():
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
    assert use_fused_modules(model) == {"norms": 2 * layers + 1, "mlps": layers}
    assert list(model.state_dict()) == keys
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(FusedRMSNorm) == 2 * layers + 1 and kinds.count(FusedSwiGLUMLP) == layers
    assert LlamaRMSNorm not in kinds and LlamaMLP not in kinds
    # In bfloat16 the kernels give the reference's values; a summation order or an exp that
    # rounded one of them differently would move a logit by about one bfloat16 step.
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=2e-2)
