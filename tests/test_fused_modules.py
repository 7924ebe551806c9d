"""FusedRMSNorm and FusedSwiGLUMLP: transformers' LlamaRMSNorm and LlamaMLP with CPU kernels;
FusedLoraLinear: PEFT's LoRA Linear with its update summed inside the product; their swap into a
model."""

import copy
import importlib
import inspect

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from llama_sft.speedups import cpu_kernels
from llama_sft.speedups.dropout import use_bits_dropout
from llama_sft.speedups.fused_modules import (
    LLAMA_MLPS,
    LLAMA_RMS_NORMS,
    FusedLoraLinear,
    FusedRMSNorm,
    FusedRotaryLlamaAttention,
    FusedSwiGLUMLP,
    RotaryEmbedding,
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
    assert use_fused_modules(model) == {
        "norms": 2 * layers + 1,
        "mlps": layers,
        "lora_linears": 0,
        "attentions": layers,
    }
    assert list(model.state_dict()) == keys
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(FusedRMSNorm) == 2 * layers + 1 and kinds.count(FusedSwiGLUMLP) == layers
    assert LlamaRMSNorm not in kinds and LlamaMLP not in kinds
    assert kinds.count(FusedRotaryLlamaAttention) == layers
    # In bfloat16 the kernels give the reference's values; a summation order or an exp that
    # rounded one of them differently would move a logit by about one bfloat16 step.
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=2e-2)


class TwoProjections(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(24, 40, bias=False)
        self.down = torch.nn.Linear(40, 24, bias=True)

    def forward(self, x):
        return self.down(self.up(x))


def lora_pair(dropout=0.25, **kwargs):
    """A LoRA model with PEFT's layers and a copy with FusedLoraLinear's class; non-zero B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["up", "down"], **kwargs)
    reference = get_peft_model(TwoProjections(), config)
    use_bits_dropout(reference)
    for name, param in reference.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    fused = copy.deepcopy(reference)
    assert use_fused_modules(fused) == {"norms": 0, "mlps": 0, "lora_linears": 2, "attentions": 0}
    assert [type(m) for m in fused.modules()].count(FusedLoraLinear) == 2
    return reference, fused


def lora_forward_backward(model, x, autocast):
    torch.manual_seed(7)  # the dropout seeds, drawn in the same order by both models
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, x.grad, grads


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bfloat16-autocast"])
def test_lora_linear_equals_peft_with_dropout_and_gradients(autocast, ops_path):
    from peft.helpers import disable_input_dtype_casting

    reference, fused = lora_pair()
    exact = copy.deepcopy(reference)
    x = torch.randn(2, 9, 24)
    with disable_input_dtype_casting(reference), disable_input_dtype_casting(fused):
        want = lora_forward_backward(reference, x, autocast)
        got = lora_forward_backward(fused, x, autocast)
    truth = lora_forward_backward(exact, x, autocast=False)
    # The update is summed inside the product: autograd sees one accumulating product, not a sum.
    assert got[0].grad_fn.name() == "ViewBackward0" and want[0].grad_fn.name() == "AddBackward0"
    assert got[0].grad_fn.next_functions[0][0].name() == "AddmmBackward0"
    assert got[0].shape == want[0].shape == (2, 9, 24) and got[0].dtype == want[0].dtype
    assert set(got[2]) == set(want[2]) and len(got[2]) == 4
    pairs = [(got[0], want[0], truth[0]), (got[1], want[1], truth[1])]
    pairs += [(got[2][name], want[2][name], truth[2][name]) for name in want[2]]
    for ours, peft_s, float32 in pairs:
        assert ours.abs().sum() > 0
        if autocast:
            # Both round to bfloat16 (PEFT the scaled update and then the sum, the product the sum
            # once), so both are compared with float32: within 1/64 of the largest value.
            scale = float(float32.detach().abs().max())
            torch.testing.assert_close(ours.float(), float32, rtol=0, atol=scale / 64)
            torch.testing.assert_close(peft_s.float(), float32, rtol=0, atol=scale / 64)
        else:
            torch.testing.assert_close(ours, peft_s, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(peft_s, float32, rtol=0, atol=0)


def test_lora_linear_leaves_other_cases_to_peft():
    reference, fused = lora_pair(dropout=0.0)
    x = torch.randn(3, 24)
    with torch.no_grad():
        with reference.disable_adapter(), fused.disable_adapter():
            assert torch.equal(fused(x), reference(x))
        # Mixed dtypes without autocast: PEFT's forward and its casts.
        half = torch.randn(3, 24, dtype=torch.bfloat16)
        fused_bf16, reference_bf16 = copy.deepcopy(fused), copy.deepcopy(reference)
        for model in (fused_bf16, reference_bf16):
            model.base_model.model.up.base_layer.to(torch.bfloat16)
            model.base_model.model.down.base_layer.to(torch.bfloat16)
        assert torch.equal(fused_bf16.base_model.model.up(half), reference_bf16.base_model.model.up(half))
        adapter = fused(x)
        torch.testing.assert_close(adapter, reference(x), rtol=1e-6, atol=1e-5)
        fused.merge_adapter()
        torch.testing.assert_close(fused(x), adapter, rtol=1e-5, atol=1e-4)
        fused.unmerge_adapter()
        merged = fused.merge_and_unload()
    assert type(merged.up) is torch.nn.Linear and type(merged.down) is torch.nn.Linear
    torch.testing.assert_close(merged(x), adapter, rtol=1e-5, atol=1e-4)


def test_lora_linears_left_alone_when_asked():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    model = get_peft_model(TwoProjections(), LoraConfig(r=4, target_modules=["up", "down"]))
    keys = list(model.state_dict())
    assert use_fused_modules(model, lora_linears=False)["lora_linears"] == 0
    assert [type(m) for m in model.modules()].count(LoraLinear) == 2
    assert use_fused_modules(model)["lora_linears"] == 2
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_embedding_equals_transformers_forward_and_backward(dtype, built):
    """RotaryEmbedding against transformers' apply_rotary_pos_emb on a (1, heads, n, head_dim)
    tensor laid out as LlamaAttention makes it: bit for bit in bfloat16 (the same roundings), within
    float32 rounding otherwise; the same for the input's gradient."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(1)
    n, heads, head_dim = 29, 4, 16
    x = torch.randn(1, n, heads, head_dim, generator=g).to(dtype).transpose(1, 2)
    angles = torch.randn(1, n, head_dim // 2, generator=g) * 3
    cos, sin = (f(torch.cat([angles, angles], -1)).to(dtype) for f in (torch.cos, torch.sin))
    grad = torch.randn(1, heads, n, head_dim, generator=g).to(dtype)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = RotaryEmbedding.apply(ours, cos, sin)
    want, _ = apply_rotary_pos_emb(theirs, theirs.detach(), cos, sin)
    got.backward(grad)
    want.backward(grad)
    assert got.shape == want.shape and got.dtype == dtype and ours.grad.dtype == dtype
    if dtype == torch.bfloat16:
        assert torch.equal(got, want) and torch.equal(ours.grad, theirs.grad)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-6)


def test_installed_transformers_has_the_mirrored_attention_forward():
    """An upgrade of transformers that changes LlamaAttention.forward turns the rotary_kernel
    speed-up off without a word (use_fused_modules keeps transformers' class); this fails first."""
    import hashlib

    import transformers
    from transformers.models.llama.modeling_llama import LlamaAttention

    import llama_sft.speedups.fused_modules as fused_modules

    fused_modules.mirrors_llama_attention.cache_clear()
    installed = hashlib.sha256(inspect.getsource(LlamaAttention.forward).encode()).hexdigest()
    assert fused_modules.mirrors_llama_attention(), (
        f"transformers {transformers.__version__}: LlamaAttention.forward is not the one "
        "FusedRotaryLlamaAttention.forward mirrors, so the rotary_kernel speed-up is off. Re-mirror it: "
        "copy the new forward into FusedRotaryLlamaAttention.forward with the rotary call replaced as "
        f"before, set LLAMA_ATTENTION_FORWARD_SHA256 to {installed}, and move pyproject.toml's "
        "transformers range and requirements.txt's pin to this version"
    )


def test_llama_attention_forward_is_the_one_mirrored(monkeypatch):
    """FusedRotaryLlamaAttention.forward mirrors LlamaAttention.forward of the pinned transformers
    (5.24): its source is the one recorded, so the class is given; with another source (a
    different transformers), LlamaAttention keeps its own class."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaConfig

    import llama_sft.speedups.fused_modules as fused_modules

    assert fused_modules.mirrors_llama_attention()
    config = LlamaConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)
    model = torch.nn.ModuleList([LlamaAttention(config, layer_idx=0)])
    monkeypatch.setattr(fused_modules, "LLAMA_ATTENTION_FORWARD_SHA256", "0" * 64)
    fused_modules.mirrors_llama_attention.cache_clear()
    assert use_fused_modules(model)["attentions"] == 0 and type(model[0]) is LlamaAttention
    monkeypatch.undo()
    fused_modules.mirrors_llama_attention.cache_clear()
    assert use_fused_modules(model)["attentions"] == 1 and type(model[0]) is FusedRotaryLlamaAttention
