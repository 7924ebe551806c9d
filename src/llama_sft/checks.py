"""Model folders, adapter folders and vocabularies, checked the same way by train, merge and chat.

Contract: every check reads only small files (config JSON, the index of a sharded model, the header
of a safetensors file) and raises ``ModelError`` with one line that names the folder or file, what
is wrong and what to do. The same bad folder gives the same message whichever command reads it; only
the flag named in it differs (``--model_name_or_path``/``--peft_path`` for train, ``--base_model``/
``--lora_model`` for merge and chat).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .data.tokenizer import HF_JSON, SP_MODEL

MODEL_CONFIG = "config.json"
# A sharded model's index, then the single file it replaces: transformers prefers safetensors.
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
# What train, merge and chat need from config.json before anything is loaded.
MODEL_CONFIG_KEYS = ("model_type", "vocab_size")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# Only LoRAs: merge folds B @ A into the base and chat merges the adapter before generating.
ADAPTER_TYPES = ("LORA",)


class ModelError(ValueError):
    """A bad model folder, adapter folder or vocabulary; the message names the folder, the file and the fix."""


def first_line(exc: BaseException) -> str:
    """An exception as one line: the messages this module raises are printed as one line on stderr."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_json(path: Path, fix: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc}); {fix}") from None
    except ValueError as exc:  # bad UTF-8 or JSON, or a number of more than 4300 digits
        raise ModelError(f"{path}: not valid JSON ({first_line(exc)}); {fix}") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: expected a JSON object, found {type(value).__name__}; {fix}")
    return value


# ---------------------------------------------------------------------------------------------
# Model folders


def read_model_config(path: str | Path, flag: str = "--model_name_or_path") -> dict:
    """config.json of a Hugging Face model folder, with the keys every command relies on."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelError(f"{folder}: {flag} is not a folder (a local Hugging Face model folder is needed)")
    config_file = folder / MODEL_CONFIG
    if not config_file.is_file():
        raise ModelError(
            f"{folder}: no config.json; {flag} must be a Hugging Face model folder "
            "(convert the checkpoint to Hugging Face format first)"
        )
    fix = "re-download or re-save the model (save_pretrained writes it)"
    config = _read_json(config_file, fix)
    missing = [key for key in MODEL_CONFIG_KEYS if key not in config]
    if missing:
        raise ModelError(f"{config_file}: has no {', '.join(missing)}; {fix}")
    rows = config["vocab_size"]
    if not isinstance(rows, int) or isinstance(rows, bool) or rows <= 0:
        raise ModelError(f"{config_file}: vocab_size is {rows!r}, not a positive integer; {fix}")
    return config


def model_vocab_size(path: str | Path, flag: str = "--model_name_or_path") -> int:
    return read_model_config(path, flag)["vocab_size"]


def _is_file(path: Path) -> bool:
    """Path.is_file, where a name the file system cannot hold (too long, say) is no file either."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def weight_files(folder: str | Path, flag: str = "--model_name_or_path") -> list[Path]:
    """The files holding a model's weights: the shards its index lists, or the single file."""
    folder = Path(folder)
    for index_name, single in WEIGHT_LAYOUTS:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = [folder / name for name in dict.fromkeys(weight_map.values())]
                if not files:
                    raise ValueError("its weight_map is empty")
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ModelError(f"{index}: not a valid shard index ({exc}); re-save the model") from None
            missing = [str(path) for path in files if not _is_file(path)]
            if missing:
                raise ModelError(
                    f"{missing[0]}: listed in {index.name} but missing; copy the whole model folder"
                )
            return files
        if (folder / single).is_file():
            return [folder / single]
    raise ModelError(
        f"{folder}: no weights (model.safetensors, pytorch_model.bin or a sharded index) in {flag}; "
        "convert the checkpoint to Hugging Face format first"
    )


def check_model_dir(path: str | Path, flag: str = "--model_name_or_path", need_weights: bool = True) -> dict:
    """Check a Hugging Face model folder before loading it; returns its config.json."""
    config = read_model_config(path, flag)
    if need_weights:
        weight_files(path, flag)
    return config


# ---------------------------------------------------------------------------------------------
# Adapter folders


def read_adapter_config(path: str | Path, flag: str = "--peft_path") -> dict:
    """adapter_config.json of a LoRA folder saved by PEFT."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelError(
            f"{folder}: {flag} is not a folder (a LoRA folder saved by PEFT is needed, e.g. "
            "output_dir/sft_lora_model)"
        )
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise ModelError(
            f"{folder}: {flag} has no adapter_config.json; give a LoRA folder saved by PEFT "
            "(e.g. output_dir/sft_lora_model)"
        )
    config = _read_json(config_file, "re-save the LoRA (PEFT's save_pretrained writes it)")
    peft_type = config.get("peft_type")
    if peft_type not in ADAPTER_TYPES:
        raise ModelError(
            f"{config_file}: {flag} is a {peft_type!r} adapter, not a LoRA; llama-sft reads LoRA adapters "
            "only (train one with llama-sft train)"
        )
    return config


def adapter_weights_file(path: str | Path, flag: str = "--peft_path") -> Path:
    folder = Path(path)
    found = next((folder / name for name in ADAPTER_FILES if (folder / name).is_file()), None)
    if found is None:
        raise ModelError(
            f"{folder}: no adapter_model.safetensors or adapter_model.bin in {flag}; "
            "copy the whole LoRA folder (PEFT's save_pretrained writes the weights beside adapter_config.json)"
        )
    return found


def check_adapter_dir(path: str | Path, flag: str = "--peft_path") -> tuple[dict, Path]:
    """Check a LoRA folder before loading it; returns (adapter_config.json, the weights file)."""
    return read_adapter_config(path, flag), adapter_weights_file(path, flag)


def _is_vocab_tensor(name: str, module: str) -> bool:
    # PEFT saves a modules_to_save copy as X.weight (sometimes as X.modules_to_save[.name].weight);
    # X.original_module.weight is the untouched base copy and X.lora_A.weight a low-rank factor,
    # neither of which has the LoRA's rows.
    return re.search(rf"(^|\.){module}(\.modules_to_save(\.[^.]+)?)?\.weight$", name) is not None


def adapter_vocab_rows(path: str | Path, flag: str = "--peft_path") -> int | None:
    """Embedding rows a LoRA was trained with, when it saved embed_tokens or lm_head (a resized
    vocabulary); None when it holds only low-rank matrices and so fits any vocabulary."""
    weights = adapter_weights_file(path, flag)
    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            # Only the header is read: the shapes, not the tensors.
            with safe_open(str(weights), framework="pt") as handle:
                shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}  # noqa: SIM118
        else:
            import torch

            try:
                state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                # Checkpoints in torch's legacy (pre-zip) format cannot be memory-mapped.
                state = torch.load(weights, map_location="cpu", weights_only=True)
            shapes = {name: list(value.shape) for name, value in state.items() if hasattr(value, "shape")}
    except Exception as exc:
        raise ModelError(
            f"{weights}: cannot read the adapter weights ({first_line(exc)}); re-save the LoRA"
        ) from None
    for module in ("embed_tokens", "lm_head"):
        for name, shape in shapes.items():
            if _is_vocab_tensor(name, module) and shape:
                return int(shape[0])
    return None


# ---------------------------------------------------------------------------------------------
# Vocabularies


def has_tokenizer(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / SP_MODEL).is_file() or (folder / HF_JSON).is_file()


def check_vocab(
    model_rows: int,
    tokenizer_size: int,
    model_path: str | Path,
    tokenizer_path: str | Path,
    virtual_pad: bool = False,
) -> bool:
    """Whether the model needs more embedding rows than it has for this tokenizer. Training grows
    them; merge and chat cannot, and refuse with their own explanation.

    A tokenizer smaller than the model is refused here: its ids would leave rows unused and, far
    more often, it is simply the wrong tokenizer. ``virtual_pad``: ``tokenizer_size`` counts a
    ``<pad>`` the tokenizer added because it had none; a prompt never holds it, so a model without
    that row still serves the tokenizer (train gives it a row, merge and chat need none).
    """
    if tokenizer_size < model_rows:
        raise ModelError(
            f"{tokenizer_path}: the tokenizer has {tokenizer_size} tokens but the model {model_path} has "
            f"{model_rows} embedding rows. This usually means the original LLaMA tokenizer (32000) was given "
            "for a Chinese-LLaMA model (49953/55296): pass the tokenizer that came with the model"
        )
    return tokenizer_size - (1 if virtual_pad else 0) > model_rows
