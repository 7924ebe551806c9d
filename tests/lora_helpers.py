"""Tiny base models and non-trivial LoRAs for the merge and chat tests (everything generated)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]


def write_base(
    folder: Path,
    vocab: int = 96,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    shards: int = 1,
    fmt: str = "safetensors",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A random LLaMA folder whose weights are split into ``shards`` files of ``fmt`` (safetensors/bin)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).to(dtype)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_weights(folder, state, shards, fmt)
    model.config.save_pretrained(str(folder))
    model.generation_config.save_pretrained(str(folder))
    return state


def write_weights(folder: Path, state: dict[str, torch.Tensor], shards: int, fmt: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    groups = [keys[i::shards] for i in range(shards)] if shards > 1 else [keys]
    groups = [sorted(g, key=keys.index) for g in groups]
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    if shards == 1:
        names = [f"{stem}.{suffix}"]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{shards:05d}.{suffix}" for i in range(shards)]
    weight_map = {}
    for name, group in zip(names, groups, strict=True):
        part = {k: state[k] for k in group}
        if fmt == "safetensors":
            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(group, name))
    if shards > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())}}
        index["weight_map"] = weight_map
        (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps(index))


def load_model(folder: Path, vocab: int | None = None):
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    if vocab is not None and vocab != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    return model


def write_lora(
    base_folder: Path,
    out: Path,
    vocab: int | None = None,
    seed: int = 1,
    r: int = 4,
    alpha: int = 8,
    targets: list[str] | None = None,
    modules_to_save: list[str] | None = None,
    start_from=None,
    fmt: str = "safetensors",
    **extra,
) -> Path:
    """A LoRA with random (non-zero) A and B; a larger ``vocab`` resizes and saves embed_tokens/lm_head."""
    model = start_from if start_from is not None else load_model(base_folder)
    torch.manual_seed(seed)
    if vocab is not None:
        model.resize_token_embeddings(vocab, mean_resizing=False)
        modules_to_save = modules_to_save or ["embed_tokens", "lm_head"]
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        target_modules=targets or TARGETS,
        modules_to_save=modules_to_save,
        lora_dropout=0.0,
        **extra,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                # DoRA starts from the norms of the weight's rows; a trained one moves them a little.
                param.mul_(1 + 0.3 * torch.rand_like(param))
            elif "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    peft_model.save_pretrained(str(out), safe_serialization=fmt == "safetensors")
    return out


def peft_reference(base_folder: Path, loras: list[Path]):
    """base + LoRAs through PEFT, applied in order (each merged before the next is loaded)."""
    from safetensors import safe_open

    model = load_model(base_folder)
    for lora in loras:
        rows = None
        weights = lora / "adapter_model.safetensors"
        if weights.is_file():
            with safe_open(str(weights), "pt") as handle:
                embed = [k for k in handle.keys() if k.endswith("embed_tokens.weight")]  # noqa: SIM118
                rows = handle.get_slice(embed[0]).get_shape()[0] if embed else None
        else:
            state = torch.load(lora / "adapter_model.bin", weights_only=True)
            embed = [k for k in state if k.endswith("embed_tokens.weight")]
            rows = state[embed[0]].shape[0] if embed else None
        if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows, mean_resizing=False)
        model = PeftModel.from_pretrained(model, str(lora)).merge_and_unload()
    return model.eval()


@torch.no_grad()
def logits(model, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (2, 12), generator=generator)
    # Make sure the newest rows (the resized part of the vocabulary) are exercised too.
    ids[0, -3:] = torch.arange(vocab - 3, vocab)
    return model.eval()(input_ids=ids).logits.float()
