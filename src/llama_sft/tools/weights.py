"""Reading a base model and LoRA adapters, and the merged tensors: what ``merge`` and ``export`` share.

Contract:

* ``read_base_model(folder)`` reads a Hugging Face model folder (``model.safetensors``,
  ``pytorch_model.bin`` or a sharded index of either): which file holds which tensor, with shapes and
  dtypes, without loading the data.
* ``read_adapter(folder, base)`` reads a LoRA folder (``adapter_config.json`` +
  ``adapter_model.safetensors`` or ``.bin``) as PEFT saved it into a list of operations per base
  tensor, checking its settings and that every tensor it changes is the base's.
* ``plan_shapes(base, adapters)`` checks every adapter against the model it is applied to (in order)
  and returns the merged model's shapes, before anything is computed or written.
* ``merged_tensor(key, tensor, adapters)`` applies the adapters in order: a full tensor
  (``modules_to_save``: ``embed_tokens``/``lm_head``) replaces what came before; a low-rank delta
  ``B @ A * scaling`` is added (``scaling`` is alpha/r, or alpha/sqrt(r) for rsLoRA), in float32; a
  DoRA adapter then rescales each output feature to its trained magnitude,
  ``W' = m * (W + delta) / ||W + delta||`` with the norm over the input features, as PEFT merges it.
  The result has the base tensor's dtype.
* ``iter_merged``/``open_weights`` stream the base one shard at a time (safetensors memory-mapped),
  so memory stays about the largest shard plus the adapters; ``SafetensorsWriter`` writes a file
  tensor by tensor from a layout known in advance.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import re
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
from ..data.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"

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
def open_weights(path: Path) -> Iterator[Callable[[str], torch.Tensor]]:
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


def vocab_source(base: BaseModel, adapters: list[Adapter]) -> Path:
    """The folder that decides the vocabulary after ``adapters``: the last one that saved embed_tokens."""
    return next(
        (
            a.folder
            for a in reversed(adapters)
            if any(isinstance(op, Replace) for op in a.ops.get(EMBED_KEY, ()))
        ),
        base.folder,
    )


def too_large(tokenizer: TextTokenizer, rows: int, source: Path) -> bool:
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
        source = vocab_source(base, adapters[: number + 1])
        if adapter.tokenizer is not None and too_large(adapter.tokenizer, rows, source):
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
    with open_weights(path) as get:
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


def unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo the rotary-half permutation that Meta -> Hugging Face conversion applies to q/k rows."""
    rows, cols = weight.shape
    return weight.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta -> Hugging Face rotary layout (the inverse of ``unpermute``)."""
    rows, cols = weight.shape
    return weight.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def output_tokenizer(base: BaseModel, adapters: list[Adapter], rows: int) -> TextTokenizer | None:
    """The tokenizer a merged or exported model gets: the last LoRA's that has one, else the base's
    (the loader's order), refused when it has fewer tokens than the ``rows`` it will index."""
    for adapter in reversed(adapters):
        if adapter.tokenizer is not None:
            if too_large(adapter.tokenizer, rows, vocab_source(base, adapters)):
                raise ModelError(
                    f"{adapter.tokenizer.directory}: this tokenizer has {len(adapter.tokenizer)} tokens but a later "
                    f"LoRA makes the vocabulary {rows}; put the tokenizer the last LoRA was trained with beside it"
                )
            return adapter.tokenizer
    if has_tokenizer(base.folder):
        tokenizer = TextTokenizer.load(base.folder)
        if too_large(tokenizer, rows, vocab_source(base, adapters)):
            raise ModelError(
                f"{base.folder}: its tokenizer has {len(tokenizer)} tokens but the merged model has {rows} "
                "rows, and no --lora_model holds a tokenizer; put the training tokenizer beside the last LoRA"
            )
        return tokenizer
    return None


def whole_modules(adapter: Adapter) -> list[str]:
    """The modules an adapter saves whole (PEFT's ``modules_to_save``, such as ``embed_tokens`` and
    ``lm_head`` for an extended vocabulary): listed in adapter_config.json, or found in its weights."""
    listed = adapter.config.get("modules_to_save") or []
    names = [name for name in listed if isinstance(name, str)] if isinstance(listed, list) else []
    for key, ops in adapter.ops.items():
        if any(isinstance(op, Replace) for op in ops):
            module = key.removesuffix(".weight").split(".")[-1]
            if module not in names:
                names.append(module)
    return names


def lora_server_notice(
    adapters: list[Adapter], base_folder: Path, merged: str | Path | None = None
) -> str | None:
    """One line for an adapter that LoRA servers cannot load (vLLM takes low-rank updates only, not
    whole modules), with the commands that serve the same model merged; None when every adapter is
    plain LoRA. ``merged`` names the folder being written by ``merge``, if that is what runs."""
    whole = [(adapter, names) for adapter in adapters if (names := whole_modules(adapter))]
    if not whole:
        return None
    adapter, names = whole[-1]
    loras = ",".join(str(a.folder) for a in adapters)
    if merged is None:
        serve = f"llama-sft merge --base_model {base_folder} --lora_model {loras} --output_dir MERGED && vllm serve MERGED"
    else:
        serve = f"vllm serve {merged}"
    return (
        f"{adapter.folder}: saves whole modules ({', '.join(names)}: modules_to_save), which vLLM and other "
        f"LoRA servers cannot load with --enable-lora; serve the merged model: {serve}"
    )
