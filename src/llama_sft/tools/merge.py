"""``llama-sft merge``: a base model plus one or more LoRAs -> one full model.

Contract: ``merge(base_model, lora_models, output_type, output_dir)`` reads a Hugging Face model
folder (``model.safetensors``, ``pytorch_model.bin`` or a sharded index of either) and LoRA folders
(``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``), and writes ``output_dir``:

* ``huggingface``: ``model-0000i-of-0000N.safetensors`` (one output shard per base shard) and
  ``model.safetensors.index.json``, ``config.json`` (``vocab_size`` follows the adapters),
  ``generation_config.json``, the tokenizer and ``template.json`` of the last LoRA that has them.
  ``AutoModelForCausalLM.from_pretrained(output_dir)`` gives the logits of base + LoRAs through PEFT.
* ``pth``: Meta's consolidated layout (``consolidated.0N.pth``, ``params.json``, ``tokenizer.model``)
  with the q/k rows in Meta's rotary order.

LoRAs apply in the order given: a full tensor (``modules_to_save``: ``embed_tokens``/``lm_head``)
replaces what came before, low-rank deltas ``B @ A * scaling`` add up (``scaling`` is alpha/r, or
alpha/sqrt(r) for rsLoRA). A DoRA adapter then rescales each output feature of ``W + delta`` to its
trained magnitude: ``W' = m * (W + delta) / ||W + delta||``, the norm taken over the input features,
as PEFT merges it. Every file is read and every shape checked before anything is written; the output
folder appears only when complete.

Memory: the base is streamed one shard at a time and each merged tensor is written as soon as it is
computed, so the peak is about the largest base shard plus the adapters (see docs/merge_and_chat.md).
Reading the folders and the arithmetic above are ``weights``', shared with ``export``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import sys
from pathlib import Path

import torch

from ..checks import ModelError
from ..data.templates import TemplateError
from ..data.tokenizer import SP_MODEL, TokenizerError
from ..loading import resolve_template
from ..options import add_config, add_lora_model, parse_command
from ..training.saving import atomic_dir
from .weights import (
    EMBED_KEY,
    LM_HEAD_KEY,
    Adapter,
    BaseModel,
    SafetensorsWriter,
    iter_merged,
    lora_server_notice,
    output_tokenizer,
    plan_shapes,
    read_adapter,
    read_base_model,
    unpermute,
)

logger = logging.getLogger(__name__)

# Meta's checkpoints were split for model parallelism by model width (7B, 13B, 33B/30B, 65B/70B).
META_SHARDS_BY_DIM = {4096: 1, 5120: 2, 6656: 4, 8192: 8}


class MergeError(ValueError):
    """A merge flag that cannot be honoured (output type, output folder, LoRA list). Problems with
    the model, adapter or vocabulary themselves are ``ModelError``, as in train and chat."""


# ---------------------------------------------------------------------------------------------
# Hugging Face layout.


def write_huggingface(
    base: BaseModel, adapters: list[Adapter], shapes: dict[str, tuple[int, ...]], out: Path
) -> None:
    count = len(base.files)
    weight_map, total = {}, 0
    for number, path in enumerate(base.files, 1):
        name = f"model-{number:05d}-of-{count:05d}.safetensors"
        layout = [(key, base.dtypes[key], shapes[key]) for key in base.keys[path]]
        writer = SafetensorsWriter(out / name, layout)
        try:
            for key, tensor in iter_merged(base, adapters, path):
                writer.write(key, tensor)
                weight_map[key] = name
        finally:
            writer.close()
        total += writer.total_size
        logger.info("wrote %s (%d tensors from %s)", name, len(layout), path.name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = dict(base.config)
    config["vocab_size"] = shapes[EMBED_KEY][0]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = base.folder / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, out / "generation_config.json")
    else:
        defaults = {
            k: config[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if config.get(k) is not None
        }
        (out / "generation_config.json").write_text(json.dumps(defaults, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Meta's consolidated .pth layout.

_META_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
# Dimension each tensor is split along across consolidated.0N.pth files (Meta's model parallelism):
# column-parallel layers by output rows, row-parallel layers and the embedding by columns.
_META_SPLIT = {
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "output": 0,
    "wo": 1,
    "w2": 1,
    "tok_embeddings": 1,
}


def meta_name(key: str) -> str | None:
    """Meta's name for a Hugging Face LLaMA tensor; None for buffers Meta does not store."""
    fixed = {
        EMBED_KEY: "tok_embeddings.weight",
        "model.norm.weight": "norm.weight",
        LM_HEAD_KEY: "output.weight",
    }
    if key in fixed:
        return fixed[key]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key)
    if match and match[2] in _META_LAYER:
        return f"layers.{match[1]}.{_META_LAYER[match[2]]}.weight"
    if key.endswith("rotary_emb.inv_freq"):
        return None
    raise MergeError(f"{key}: no place for this tensor in Meta's LLaMA layout; use --output_type huggingface")


def meta_params(config: dict, vocab_size: int) -> dict:
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    params = {
        "dim": dim,
        "n_heads": heads,
        "n_layers": config["num_hidden_layers"],
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "vocab_size": vocab_size,
    }
    kv_heads = config.get("num_key_value_heads") or heads
    if kv_heads != heads:
        params["n_kv_heads"] = kv_heads
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
    if theta != 10000.0:
        params["rope_theta"] = theta
    # Meta code derives the FFN width from multiple_of; record one that reproduces it when there is one.
    base_hidden = int(2 * 4 * dim / 3)
    for multiple in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if multiple * math.ceil(base_hidden / multiple) == config.get("intermediate_size"):
            params["multiple_of"] = multiple
            break
    return params


def write_pth(
    base: BaseModel,
    adapters: list[Adapter],
    shapes: dict[str, tuple[int, ...]],
    out: Path,
    shards: int | None,
) -> None:
    config = base.config
    if config.get("model_type", "llama") != "llama":
        raise MergeError(
            f"{base.folder}/config.json: model_type {config.get('model_type')!r}; pth output is for LLaMA"
        )
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    shards = shards or META_SHARDS_BY_DIM.get(config["hidden_size"], 1)
    for key in base.shapes:
        meta_name(key)  # every tensor must have a place before anything is written
    for part in range(shards):
        # One pass over the base per output file: only 1/shards of the model is held at a time.
        state = {}
        for path in base.files:
            for key, tensor in iter_merged(base, adapters, path):
                name = meta_name(key)
                if name is None:
                    continue
                if name.endswith("attention.wq.weight"):
                    tensor = unpermute(tensor, heads)
                elif name.endswith("attention.wk.weight"):
                    tensor = unpermute(tensor, kv_heads)
                names = [name]
                if key == EMBED_KEY and LM_HEAD_KEY not in base.shapes:
                    names.append("output.weight")  # tied embeddings: Meta stores the head separately
                for meta in names:
                    short = meta.split(".")[-2]
                    part_tensor = tensor
                    if short in _META_SPLIT and shards > 1:
                        part_tensor = tensor.chunk(shards, dim=_META_SPLIT[short])[part]
                    state[meta] = part_tensor.clone()
        torch.save(state, out / f"consolidated.{part:02d}.pth")
        logger.info("wrote consolidated.%02d.pth (%d tensors)", part, len(state))
        del state
    params = meta_params(config, shapes[EMBED_KEY][0])
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------


def merge(
    base_model: str | Path,
    lora_models: list[str | Path],
    output_type: str = "huggingface",
    output_dir: str | Path = "merged",
    pth_shards: int | None = None,
) -> Path:
    if output_type not in ("huggingface", "pth"):
        raise MergeError(f"--output_type {output_type!r}: choose huggingface or pth")
    if not lora_models:
        raise MergeError("--lora_model is empty: give one LoRA folder or several separated by commas")
    out = Path(output_dir)
    for given in [base_model, *lora_models]:
        # The old --output_dir is deleted once the new one is complete: it must not hold an input.
        if out.resolve() in (Path(given).resolve(), *Path(given).resolve().parents):
            raise MergeError(f"--output_dir {out} holds the input {given}; write the merged model elsewhere")
    base = read_base_model(base_model)
    adapters = [read_adapter(folder, base) for folder in lora_models]
    shapes = plan_shapes(base, adapters)
    rows = shapes[EMBED_KEY][0]
    tokenizer = output_tokenizer(base, adapters, rows)
    if rows != base.shapes[EMBED_KEY][0]:
        logger.info("vocabulary: %d -> %d tokens", base.shapes[EMBED_KEY][0], rows)
    if notice := lora_server_notice(adapters, base.folder, merged=out):
        # The merged folder is the way to serve such an adapter; say so where the user decides.
        logger.warning(notice)
    logger.info(
        "merging %d LoRA(s) into %s, %d base file(s), largest %.1f MB",
        len(adapters),
        base.folder,
        len(base.files),
        base.largest_file_bytes / 2**20,
    )
    with atomic_dir(out) as staging:
        if output_type == "huggingface":
            write_huggingface(base, adapters, shapes, staging)
            if tokenizer is not None:
                tokenizer.save(staging)
        else:
            write_pth(base, adapters, shapes, staging, pth_shards)
            if tokenizer is not None and tokenizer.sp is not None:
                shutil.copyfile(tokenizer.directory / SP_MODEL, staging / SP_MODEL)
        if tokenizer is None:
            logger.warning("no tokenizer in the LoRA folders or the base model; copy one into %s", out)
        template = resolve_template(None, [a.folder for a in adapters], None, default=None)
        if template is not None:
            # chat reads it, so the merged model is prompted as the LoRA was trained; vLLM and
            # transformers' apply_chat_template read the same prompts from tokenizer_config.json.
            template.save(staging)
            template.write_chat_template(staging)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-sft merge",
        description="Merge LoRA(s) into a base model, streaming the base one shard at a time.",
    )
    add_config(parser)
    parser.add_argument(
        "--base_model", required=True, help="Hugging Face model folder (safetensors or .bin)."
    )
    add_lora_model(
        parser, "LoRA folder(s) (e.g. the Chinese-LLaMA LoRA, then the Chinese-Alpaca LoRA).", required=True
    )
    parser.add_argument(
        "--output_type",
        default="huggingface",
        choices=["huggingface", "pth"],
        help="huggingface: safetensors shards + config; pth: Meta's consolidated.0N.pth + params.json.",
    )
    parser.add_argument("--output_dir", required=True, help="Folder to write; replaced only once complete.")
    parser.add_argument(
        "--pth_shards",
        type=int,
        default=None,
        help="Number of consolidated.0N.pth files (default: Meta's split for the model width: 1 for 7B).",
    )
    return parser


def main(argv: list[str]) -> None:
    args = parse_command(build_parser(), argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        out = merge(args.base_model, args.lora_model, args.output_type, args.output_dir, args.pth_shards)
    except (ModelError, MergeError, TokenizerError, TemplateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"merged model written to {out}")
