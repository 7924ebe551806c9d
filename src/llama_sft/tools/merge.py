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
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import mmap
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..checks import (
    ADAPTER_CONFIG,
    ModelError,
    check_adapter_dir,
    check_model_dir,
    check_vocab,
    first_line,
    has_tokenizer,
    weight_files,
)
from ..data.templates import TEMPLATE_FILE, TemplateError, load_template
from ..data.tokenizer import SP_MODEL, TextTokenizer, TokenizerError
from ..training.saving import atomic_dir

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
# Meta's checkpoints were split for model parallelism by model width (7B, 13B, 33B/30B, 65B/70B).
META_SHARDS_BY_DIM = {4096: 1, 5120: 2, 6656: 4, 8192: 8}

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


class MergeError(ValueError):
    """A merge flag that cannot be honoured (output type, output folder, LoRA list). Problems with
    the model, adapter or vocabulary themselves are ``ModelError``, as in train and chat."""


# ---------------------------------------------------------------------------------------------
# Base model: which files hold which tensors, with shapes and dtypes, without loading the data.


@dataclass
class BaseModel:
    folder: Path
    config: dict
    files: list[Path]
    keys: dict[Path, list[str]]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]

    @property
    def largest_file_bytes(self) -> int:
        return max(path.stat().st_size for path in self.files)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        # mmap: tensors are paged in as they are read, so a shard never needs a second copy in memory.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        try:
            # Checkpoints in torch's legacy (pre-zip) format cannot be memory-mapped.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(
                f"{path}: cannot read the weights ({first_line(exc)}); re-save the model"
            ) from None
    except Exception as exc:
        raise ModelError(
            f"{path}: cannot read the weights ({first_line(exc)}); only plain tensor files load safely"
        ) from None
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a dict of tensors; re-save the model with save_pretrained")
    return state


@contextmanager
def _open_weights(path: Path) -> Iterator[Callable[[str], torch.Tensor]]:
    """Yield a getter ``name -> tensor`` over one weight file; memory is released on exit.

    safetensors files are memory-mapped and read without copying: a tensor that no adapter changes
    goes from the page cache straight to the output file.
    """
    if path.suffix != ".safetensors":
        state = _load_bin(path)
        try:
            yield state.__getitem__
        finally:
            del state
        return
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
        # ACCESS_COPY: a writable (copy-on-write) view, which torch.frombuffer wants; nothing is copied
        # unless written, and nothing here writes.
        # Held only through this list and the tensors: torch.frombuffer keeps a reference to the map.
        maps = [mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)]
    start = 8 + header_size

    def get(name: str) -> torch.Tensor:
        entry = header[name]
        dtype = DTYPES_BY_NAME[entry["dtype"]]
        begin, end = entry["data_offsets"]
        if begin == end:
            return torch.empty(entry["shape"], dtype=dtype)
        flat = torch.frombuffer(
            maps[0], dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin
        )
        return flat.view(entry["shape"])

    try:
        yield get
    finally:
        # Not closed here: closing unmaps the file even under a tensor that still views it (one a caller
        # kept, or one a traceback holds), and reading that tensor then crashes the process. Dropped
        # instead, the map is unmapped when the last tensor viewing it is freed: at once, when none is.
        maps.clear()


def read_base_model(folder: str | Path) -> BaseModel:
    folder = Path(folder)
    config = check_model_dir(folder, "--base_model", need_weights=False)
    files = weight_files(folder, "--base_model")
    keys, shapes, dtypes = {}, {}, {}
    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as handle:
                    names = list(handle.keys())
                    for name in names:
                        piece = handle.get_slice(name)
                        shapes[name] = tuple(piece.get_shape())
                        dtypes[name] = DTYPES_BY_NAME[piece.get_dtype()]
            except Exception as exc:
                raise ModelError(
                    f"{path}: not a readable safetensors file ({first_line(exc)}); re-save the model"
                ) from None
        else:
            state = _load_bin(path)
            names = [name for name, value in state.items() if isinstance(value, torch.Tensor)]
            for name in names:
                shapes[name], dtypes[name] = tuple(state[name].shape), state[name].dtype
            del state
        keys[path] = names
    if EMBED_KEY not in shapes:
        raise ModelError(
            f"{folder}: the weights have no {EMBED_KEY}; --base_model must be a LLaMA-family model"
        )
    return BaseModel(folder, config, files, keys, shapes, dtypes)


# ---------------------------------------------------------------------------------------------
# Adapters: what each one does to which base tensor.


@dataclass
class Replace:
    tensor: torch.Tensor


@dataclass
class LowRank:
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    # Linear: delta = B @ A (transposed for fan_in_fan_out); embedding: delta = (B @ A).T
    transpose: bool
    # DoRA: the trained norm of each output feature (B's rows), or None for a plain LoRA.
    magnitude: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.b.shape[0], self.a.shape[1]
        return (cols, rows) if self.transpose else (rows, cols)


@dataclass
class Adapter:
    folder: Path
    weights_file: Path
    config: dict
    ops: dict[str, list[Replace | LowRank]] = field(default_factory=dict)
    tokenizer: TextTokenizer | None = None


_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<embedding>embedding_)?(?P<ab>[AB])(?:\.[^.]+)?(?:\.weight)?$")
_DORA = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name exactly or as a suffix regex."""
    for pattern, value in (patterns or {}).items():
        if pattern == module or re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _check_lora_settings(config: dict, config_file: Path) -> None:
    """The adapter_config.json values the merge computes with, checked for type: a string rank or
    alpha, a pattern that is not a regular expression or a flag that is not a boolean is refused in
    one line rather than failing, or merging wrongly, in the arithmetic."""

    def bad(key: str, value: object, wanted: str) -> ModelError:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        return ModelError(
            f"{config_file}: {key} is {shown}, not {wanted}; re-save the LoRA (PEFT's save_pretrained "
            "writes adapter_config.json) or fix that value"
        )

    def number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

    def rank(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    for key in ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias"):
        if config.get(key) not in (None, True, False):
            raise bad(key, config[key], "true or false")
    if "r" in config and not rank(config["r"]):
        raise bad("r", config["r"], "a positive integer")
    if "lora_alpha" in config and not number(config["lora_alpha"]):
        raise bad("lora_alpha", config["lora_alpha"], "a finite number")
    for key, valid, wanted in (
        ("alpha_pattern", number, "a finite number"),
        ("rank_pattern", rank, "a positive integer"),
    ):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise bad(key, patterns, "an object of module patterns")
        for pattern, value in patterns.items():
            if not valid(value):
                raise bad(f"{key}[{pattern!r}]", value, wanted)
            try:
                re.compile(rf"(.*\.)?({pattern})$")  # as _pattern_value matches it
            except re.error:
                raise bad(f"the {key} key", pattern, "a regular expression") from None


def read_adapter(folder: str | Path, base: BaseModel) -> Adapter:
    folder = Path(folder)
    config, weights_file = check_adapter_dir(folder, "--lora_model")
    config_file = folder / ADAPTER_CONFIG
    _check_lora_settings(config, config_file)
    # PEFT can load this variant, but its update is not B @ A alone: refused rather than mis-merged.
    if config.get("lora_bias"):
        raise ModelError(
            f"{config_file}: lora_bias is set; llama-sft merges LoRA and DoRA adapters without it"
        )
    if config.get("trainable_token_indices"):
        raise ModelError(
            f"{config_file}: trainable_token_indices adapters are not supported by llama-sft merge"
        )
    try:
        if weights_file.suffix == ".safetensors":
            with safe_open(str(weights_file), framework="pt") as handle:
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        else:
            tensors = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"{weights_file}: cannot read the adapter weights ({first_line(exc)}); re-save the LoRA"
        ) from None

    adapter = Adapter(folder, weights_file, config)
    pairs: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    full: dict[str, Replace] = {}
    for name, tensor in tensors.items():
        key = name.removeprefix(PEFT_PREFIX)
        match = _LORA.match(key)
        if match:
            pairs.setdefault((match["module"], bool(match["embedding"])), {})[match["ab"]] = tensor
            continue
        match = _DORA.match(key)
        if match:
            magnitudes[match["module"]] = tensor
            continue
        if ".original_module." in key:
            # PEFT also saves the untouched base copy of a resized modules_to_save layer; not an update.
            continue
        # A full tensor from modules_to_save. When the vocabulary was resized PEFT writes it twice, as
        # X.weight and X.modules_to_save.weight (the same values); the plain name wins.
        plain = re.sub(r"\.(modules_to_save(\.[^.]+)?|base_layer)(?=\.weight$)", "", key)
        if plain != key and plain in full:
            continue
        full[plain] = Replace(tensor)
    for key, op in full.items():
        adapter.ops[key] = [op]
    if not pairs:
        raise ModelError(f"{weights_file}: holds no LoRA weights (lora_A/lora_B); is it a LoRA adapter?")
    dora = bool(config.get("use_dora"))
    if magnitudes and not dora:
        raise ModelError(
            f"{weights_file}: holds DoRA magnitudes but {config_file} has no use_dora: true; "
            "save the adapter config and weights together again"
        )
    alpha, rank = config.get("lora_alpha", 8), config.get("r", 8)
    for (module, embedding), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ModelError(
                f"{weights_file}: {module} has lora_{''.join(ab)} without its partner; re-save the LoRA"
            )
        r = ab["A"].shape[0]
        if ab["B"].shape[-1] != r:
            raise ModelError(f"{weights_file}: {module}: lora_A and lora_B ranks differ; the file is corrupt")
        module_alpha = _pattern_value(config.get("alpha_pattern"), module, alpha)
        module_rank = _pattern_value(config.get("rank_pattern"), module, rank)
        if module_rank != r:
            logger.warning(
                "%s: %s has rank %d, config says %d; using the tensors' rank",
                weights_file,
                module,
                r,
                module_rank,
            )
        if r == 0:
            raise ModelError(f"{weights_file}: {module} has rank 0 (empty lora_A); re-save the LoRA")
        scaling = module_alpha / math.sqrt(r) if config.get("use_rslora") else module_alpha / r
        if not abs(scaling) <= torch.finfo(torch.float32).max:
            raise ModelError(
                f"{config_file}: lora_alpha {module_alpha!r} over rank {r} scales {module} by {scaling:.3g}, "
                "beyond float32; the adapter_config.json is not this LoRA's (lora_alpha is usually 1-4x r)"
            )
        transpose = embedding or bool(config.get("fan_in_fan_out"))
        magnitude = magnitudes.pop(module, None)
        if dora and (magnitude is None or magnitude.numel() != ab["B"].shape[0]):
            found = "none" if magnitude is None else f"{magnitude.numel()} values"
            raise ModelError(
                f"{weights_file}: {module}: a DoRA adapter needs a lora_magnitude_vector of "
                f"{ab['B'].shape[0]} values (found {found}); re-save the adapter"
            )
        adapter.ops.setdefault(f"{module}.weight", []).append(
            LowRank(ab["A"], ab["B"], scaling, transpose, magnitude)
        )
    if magnitudes:
        raise ModelError(
            f"{weights_file}: {next(iter(magnitudes))} has a DoRA magnitude but no lora_A/lora_B; "
            "re-save the adapter"
        )
    for key in adapter.ops:
        if key not in base.shapes:
            raise ModelError(
                f"{weights_file}: changes {key}, which the base model {base.folder} does not have; "
                "was this LoRA trained on another base model?"
            )
    if has_tokenizer(folder):
        adapter.tokenizer = TextTokenizer.load(folder)
    return adapter


def _vocab_source(base: BaseModel, adapters: list[Adapter]) -> Path:
    """The folder that decides the vocabulary after ``adapters``: the last one that saved embed_tokens."""
    return next(
        (
            a.folder
            for a in reversed(adapters)
            if any(isinstance(op, Replace) for op in a.ops.get(EMBED_KEY, ()))
        ),
        base.folder,
    )


def _too_large(tokenizer: TextTokenizer, rows: int, source: Path) -> bool:
    """Whether ``tokenizer`` has more tokens than the merged rows (a smaller one is refused by
    ``check_vocab`` as in train and chat). A merged model cannot grow its embedding, and a virtual
    <pad> the tokenizer added itself never needs a row."""
    return check_vocab(rows, len(tokenizer), source, tokenizer.directory, virtual_pad=tokenizer.added_pad)


def plan_shapes(base: BaseModel, adapters: list[Adapter]) -> dict[str, tuple[int, ...]]:
    """Check every adapter against the model it is applied to; return the merged model's shapes."""
    shapes = dict(base.shapes)
    for number, adapter in enumerate(adapters):
        rows_before = shapes[EMBED_KEY][0]
        grown = {}
        for key, ops in adapter.ops.items():
            for op in ops:
                if isinstance(op, Replace):
                    new, old = tuple(op.tensor.shape), shapes[key]
                    if key in (EMBED_KEY, LM_HEAD_KEY) and new[1:] == old[1:]:
                        if new[0] < rows_before:
                            raise ModelError(
                                f"{adapter.weights_file}: its {key} has {new[0]} rows, fewer than the "
                                f"{rows_before} of the model it is applied to; vocabularies only grow, so give "
                                "--lora_model in training order (e.g. the Chinese-LLaMA LoRA before the "
                                "Chinese-Alpaca LoRA)"
                            )
                        grown[key] = new[0]
                    elif new != old:
                        raise ModelError(
                            f"{adapter.weights_file}: {key} has shape {list(new)} but the model has {list(old)}; "
                            "was this LoRA trained on another base model?"
                        )
                    shapes[key] = new
                elif op.shape != shapes[key]:
                    raise ModelError(
                        f"{adapter.weights_file}: the LoRA delta for {key} has shape {list(op.shape)} but the "
                        f"model's weight has {list(shapes[key])}; was this LoRA trained on another base model "
                        "or vocabulary?"
                    )
        if LM_HEAD_KEY in shapes and shapes[EMBED_KEY][0] != shapes[LM_HEAD_KEY][0]:
            have = ", ".join(grown) or "neither"
            raise ModelError(
                f"{adapter.weights_file}: changes the vocabulary but holds {have} of embed_tokens and lm_head; "
                "a LoRA over a resized vocabulary must be trained with --modules_to_save embed_tokens,lm_head"
            )
        rows = shapes[EMBED_KEY][0]
        source = _vocab_source(base, adapters[: number + 1])
        if adapter.tokenizer is not None and _too_large(adapter.tokenizer, rows, source):
            where = adapter.tokenizer.directory
            raise ModelError(
                f"{where}: this tokenizer has {len(adapter.tokenizer)} tokens but the model after applying "
                f"{adapter.weights_file} has {rows} embedding rows; put the tokenizer the LoRA was trained "
                "with beside it (a LoRA over a resized vocabulary must hold embed_tokens and lm_head)"
            )
    return shapes


# ---------------------------------------------------------------------------------------------
# Applying the adapters, one base tensor at a time.


def merged_tensor(key: str, tensor: torch.Tensor, adapters: list[Adapter]) -> torch.Tensor:
    ops = [op for adapter in adapters for op in adapter.ops.get(key, ())]
    if not ops:
        return tensor
    # Deltas are summed in float32 (a bf16/fp16 sum would round small deltas away), with one fused
    # W + s * (B @ A) per LoRA so that a merged tensor costs one extra copy, not three.
    current, owned = tensor, False
    for op in ops:
        if isinstance(op, Replace):
            current, owned = op.tensor, False
            continue
        a, b = op.a.float(), op.b.float()
        left, right = (a.T, b.T) if op.transpose else (b, a)
        if owned:
            current.addmm_(left, right, alpha=op.scaling)
        else:
            current, owned = torch.addmm(current.float(), left, right, alpha=op.scaling), True
        if op.magnitude is not None:
            # DoRA, in place: an output feature is a row of the weight, or a column when it is stored
            # transposed; the norm is of the weight this adapter was trained on plus its delta.
            inputs = 0 if op.transpose else 1
            norm = torch.linalg.vector_norm(current, dim=inputs, keepdim=True)
            current.mul_(op.magnitude.float().view(norm.shape) / norm)
    return current.to(tensor.dtype).contiguous()


def iter_merged(base: BaseModel, adapters: list[Adapter], path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    with _open_weights(path) as get:
        for key in base.keys[path]:
            yield key, merged_tensor(key, get(key), adapters)


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, so a shard is never held whole in memory.

    The header (names, dtypes, shapes, offsets) is known before any data is computed, which is what
    lets the data follow it one tensor at a time.
    """

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        self.expected = []
        for name, dtype, shape in layout:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self.expected.append((name, dtype, shape))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.total_size = offset
        self.handle = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.handle.write(len(raw).to_bytes(8, "little") + raw)
        self.position = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, dtype, shape = self.expected[self.position]
        if (name, tensor.dtype, tuple(tensor.shape)) != (expected_name, dtype, shape):
            raise RuntimeError(f"internal error: {name} written out of plan")
        self.position += 1
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self.handle.write(memoryview(data.numpy()))

    def close(self) -> None:
        self.handle.close()


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


def unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo the rotary-half permutation that Meta -> Hugging Face conversion applies to q/k rows."""
    rows, cols = weight.shape
    return weight.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta -> Hugging Face rotary layout (the inverse of ``unpermute``)."""
    rows, cols = weight.shape
    return weight.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


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


def _output_tokenizer(base: BaseModel, adapters: list[Adapter], rows: int) -> TextTokenizer | None:
    for adapter in reversed(adapters):
        if adapter.tokenizer is not None:
            if _too_large(adapter.tokenizer, rows, _vocab_source(base, adapters)):
                raise ModelError(
                    f"{adapter.tokenizer.directory}: this tokenizer has {len(adapter.tokenizer)} tokens but a later "
                    f"LoRA makes the vocabulary {rows}; put the tokenizer the last LoRA was trained with beside it"
                )
            return adapter.tokenizer
    if has_tokenizer(base.folder):
        tokenizer = TextTokenizer.load(base.folder)
        if _too_large(tokenizer, rows, _vocab_source(base, adapters)):
            raise ModelError(
                f"{base.folder}: its tokenizer has {len(tokenizer)} tokens but the merged model has {rows} "
                "rows, and no --lora_model holds a tokenizer; put the training tokenizer beside the last LoRA"
            )
        return tokenizer
    return None


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
    tokenizer = _output_tokenizer(base, adapters, rows)
    if rows != base.shapes[EMBED_KEY][0]:
        logger.info("vocabulary: %d -> %d tokens", base.shapes[EMBED_KEY][0], rows)
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
        template = next(
            (a.folder / TEMPLATE_FILE for a in reversed(adapters) if (a.folder / TEMPLATE_FILE).is_file()),
            None,
        )
        if template is not None:
            # chat reads it, so the merged model is prompted as the LoRA was trained; vLLM and
            # transformers' apply_chat_template read the same prompts from tokenizer_config.json.
            shutil.copyfile(template, staging / TEMPLATE_FILE)
            load_template(staging).write_chat_template(staging)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-sft merge",
        description="Merge LoRA(s) into a base model, streaming the base one shard at a time.",
    )
    parser.add_argument(
        "--base_model", required=True, help="Hugging Face model folder (safetensors or .bin)."
    )
    parser.add_argument(
        "--lora_model",
        required=True,
        help="LoRA folder(s), comma-separated, applied in this order (e.g. Chinese-LLaMA LoRA,Chinese-Alpaca LoRA).",
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


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    loras = [part.strip() for part in args.lora_model.split(",") if part.strip()]
    try:
        out = merge(args.base_model, loras, args.output_type, args.output_dir, args.pth_shards)
    except (ModelError, MergeError, TokenizerError, TemplateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"merged model written to {out}")
