"""Writing output folders so that a crash never leaves a half-written one in place of a good one.

Contract: ``with atomic_dir(final) as tmp:`` yields an empty sibling folder; when the block ends
without error, ``tmp`` replaces ``final`` (the previous ``final`` survives until the new one is
complete); on error ``tmp`` is removed and ``final`` is untouched. ``write_lora_folder`` fills a
folder with what ``sft_lora_model`` must hold beside the adapter weights; ``write_model_folder``
what ``sft_full_model`` (a complete Hugging Face model folder, after full fine-tuning) must hold
beside the model's weights and config. ``output_name(full, task)`` is the name of either; a
pre-training run writes ``pt_lora_model`` / ``pt_full_model``, the same folders without a template;
a preference run (``dpo``) ``dpo_lora_model`` / ``dpo_full_model``, the same folders as SFT's.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..data.templates import Template
from ..data.tokenizer import TextTokenizer

LORA_DIR = "sft_lora_model"
FULL_DIR = "sft_full_model"
PT_LORA_DIR = "pt_lora_model"
PT_FULL_DIR = "pt_full_model"
DPO_LORA_DIR = "dpo_lora_model"
DPO_FULL_DIR = "dpo_full_model"
OUTPUT_DIRS = (LORA_DIR, FULL_DIR, PT_LORA_DIR, PT_FULL_DIR, DPO_LORA_DIR, DPO_FULL_DIR)
TASKS = ("sft", "pt", "dpo")
ARGS_FILE = "training_args.json"


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_tree(tmp)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def adapter_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    if (folder / "adapter_model.safetensors").is_file():
        return load_file(folder / "adapter_model.safetensors")
    return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)


def output_name(full: bool, task: str = "sft") -> str:
    if task == "pt":
        return PT_FULL_DIR if full else PT_LORA_DIR
    if task == "dpo":
        return DPO_FULL_DIR if full else DPO_LORA_DIR
    return FULL_DIR if full else LORA_DIR


def _describe(folder: Path, tokenizer: TextTokenizer, template: Template | None, run_args: dict) -> None:
    """Tokenizer, template (none after pre-training: plain text has no prompt) and the run's arguments."""
    tokenizer.save(folder)
    if template is not None:
        template.save(folder)
        template.write_chat_template(folder)
    (folder / ARGS_FILE).write_text(json.dumps(run_args, ensure_ascii=False, indent=2, default=str) + "\n")


def write_lora_folder(
    folder: Path,
    tokenizer: TextTokenizer,
    template: Template | None,
    run_args: dict,
    safetensors: bool = True,
) -> None:
    """Complete a folder that already holds PEFT's adapter files (as ``Trainer.save_model`` writes them)."""
    tensors = adapter_tensors(folder)
    if not any("lora_" in name for name in tensors):
        raise RuntimeError(f"{folder}: the saved adapter holds no LoRA weights; refusing to publish it")
    if not safetensors:
        torch.save(tensors, folder / "adapter_model.bin")
        (folder / "adapter_model.safetensors").unlink()
    _describe(folder, tokenizer, template, run_args)


def write_model_folder(
    folder: Path, tokenizer: TextTokenizer, template: Template | None, run_args: dict
) -> None:
    """Complete a folder that already holds a whole model (as ``Trainer.save_model`` writes it after
    full fine-tuning): tokenizer, template and the run's arguments, so chat and merge read it alone."""
    if (
        not (folder / "config.json").is_file()
        or not any(folder.glob("model*.safetensors"))
        and not any(folder.glob("pytorch_model*.bin"))
    ):
        raise RuntimeError(f"{folder}: the saved model has no config.json or weights; refusing to publish it")
    _describe(folder, tokenizer, template, run_args)
