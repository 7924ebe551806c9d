"""``llama-sft export``: a base model plus LoRAs (or a merged model) -> one GGUF file for llama.cpp and Ollama.

Contract: ``export(base_model, lora_models, output_file, outtype)`` reads the same folders as ``merge``
(a Hugging Face LLaMA folder; LoRA folders applied in order, folded in as ``merge`` folds them) and
writes ``output_file`` (GGUF, for llama.cpp's ``llama`` graph) and ``OUTPUT.Modelfile`` beside it
(Ollama). Everything is written through the ``gguf`` package: its writer, key names, tensor-name
map and quantisers.

* Tensors: ``f32``, ``f16``, ``bf16`` or ``q8_0``; norms (1-D) stay float32, as llama.cpp's own
  converter keeps them; a matrix whose rows do not split into 32-value blocks falls back to f16 in
  ``q8_0``. ``q4_k_m``, ``q5_k_m``, ``q6_k``, ``q4_0`` and ``q5_0`` are made by llama.cpp's own
  quantizer (llama-cpp-python) from the float file written on the way, llama.cpp choosing each
  tensor's type. A comma-separated ``outtype`` writes NAME.TYPE.gguf for each from one pass over
  the weights; ``check`` runs each file through llama.cpp on held-out text (perplexity, top-1
  agreement with the float file). The q/k rows are put in llama.cpp's rotary order (Meta's interleaved pairs, the inverse of
  the permutation the Hugging Face conversion applied), per key/value head for grouped-query attention.
* Metadata: context length, sizes, head counts (grouped key/value heads included), RoPE base and
  linear or YaRN scaling, RMS epsilon; the SentencePiece vocabulary with scores and token types
  (normal, unknown, control, user-defined, byte; rows past the tokenizer are unused fillers), the
  BOS/EOS/UNK/pad ids, the add-BOS flag and the space prefix; the prompt template (``template.json``
  of the last LoRA that has one, else the base's) as the Jinja ``tokenizer.chat_template`` that
  ``merge`` writes into tokenizer_config.json.
* Streaming: one base shard is open (memory-mapped) at a time and each tensor is written as soon as it
  is merged and converted, so memory stays about one shard plus the adapters (docs/export.md).
* Safety: everything is read and checked before the first byte is written; the file is written under
  a temporary name in the output folder and renamed into place; an existing output is refused unless
  ``overwrite``; a disk without room for the file is refused before writing.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from ..checks import MODEL_CONFIG, ModelError, has_tokenizer
from ..data.records import DataError
from ..data.templates import Template, TemplateError
from ..data.tokenizer import SP_MODEL, TextTokenizer, TokenizerError
from ..loading import resolve_template
from ..options import add_config, add_lora_model, parse_command
from .evaluate.perplexity import perplexity_result, text_blocks
from .weights import (
    EMBED_KEY,
    Adapter,
    BaseModel,
    lora_server_notice,
    merged_tensor,
    open_weights,
    output_tokenizer,
    plan_shapes,
    read_adapter,
    read_base_model,
    unpermute,
)

logger = logging.getLogger(__name__)

QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
# Types llama.cpp's own quantizer makes from the float file (the gguf package has no k-quant writer);
# each name is the binding's llama_ftype constant.
LLAMA_CPP_TYPES = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
}
OUTTYPES = (*QTYPES, *LLAMA_CPP_TYPES)
# The float file quantized types are made from, and --check's reference: the most precise one asked for,
# else an f16 file written on the way and removed (llama.cpp's own converter writes f16 by default).
FLOAT_SOURCES = ("f32", "f16", "bf16")
LLAMA_CPP_MISSING = (
    "is made by llama.cpp's quantizer, through llama-cpp-python, which is not installed; "
    "install it with `pip install 'llama-sft[llamacpp]'` (or `make llama-cpp`)"
)
ARCH = gguf.MODEL_ARCH.LLAMA
ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]
# Hugging Face classes whose weights are llama.cpp's LLaMA graph.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
# Buffers some older checkpoints saved; llama.cpp computes them.
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)
# The space a file needs beyond its tensors (header, vocabulary), and a margin for the rest of the disk.
DISK_MARGIN = 64 * 2**20


class ExportError(ValueError):
    """A flag that cannot be honoured (output type, output file). Problems with the model, adapter,
    vocabulary or tokenizer are ``ModelError``, as in train, merge and chat."""


# ---------------------------------------------------------------------------------------------
# Hyper-parameters


def _config_file(base: BaseModel) -> Path:
    return base.folder / MODEL_CONFIG


def check_architecture(base: BaseModel) -> None:
    """Refuse what llama.cpp's LLaMA graph would load wrongly or not at all."""
    config, where = base.config, _config_file(base)
    model_type = config.get("model_type")
    architectures = config.get("architectures") or list(SUPPORTED_ARCHITECTURES)
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ModelError(
            f"{where}: architectures is {_shown(architectures)}, not a list of class names; {_RESAVE_CONFIG}"
        )
    if model_type != "llama" or not set(architectures) <= set(SUPPORTED_ARCHITECTURES):
        found = f"model_type {_shown(model_type)}, architectures {_shown(architectures)}"
        raise ModelError(
            f"{where}: {found}; llama-sft export writes llama.cpp's LLaMA graph (model_type 'llama', "
            "LlamaForCausalLM); convert other architectures with llama.cpp's convert_hf_to_gguf.py"
        )
    for flag in ("attention_bias", "mlp_bias"):
        value = config.get(flag)
        if value not in (None, False):
            state = "true" if value is True else f"{_shown(value)}, not true or false"
            raise ModelError(
                f"{where}: {flag} is {state}; llama-sft export writes LLaMA models without bias vectors; "
                "convert this model with llama.cpp's convert_hf_to_gguf.py"
            )
    read_hparams(base)


_RESAVE_CONFIG = "re-save the model (save_pretrained writes config.json) or fix that key"
# GGUF stores sizes as unsigned 32-bit integers.
_UINT32 = 2**32 - 1


def _shown(value: object) -> str:
    """A config value in a one-line message: repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive_int(config: dict, key: str, where: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None and default is None:
        raise ModelError(f"{where}: has no {key}; {_RESAVE_CONFIG}")
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _UINT32):
        raise ModelError(f"{where}: {key} is {_shown(value)}, not a positive integer; {_RESAVE_CONFIG}")
    return value


def _positive_number(value: object, what: str, where: Path) -> float:
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise ModelError(f"{where}: {what} is {_shown(value)}, not a positive number; {_RESAVE_CONFIG}")
    return float(value)


@dataclass
class HParams:
    """config.json's hyper-parameters as llama.cpp's LLaMA graph reads them, checked against the weights."""

    context: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict  # {} or {"type": "linear" | "yarn", "factor": float, ...}


def read_hparams(base: BaseModel) -> HParams:
    """The hyper-parameters, each checked for type and range, and the sizes checked against the
    weights' shapes: a GGUF whose sizes disagree with its tensors is one llama.cpp refuses to load."""
    config, where = base.config, _config_file(base)
    hidden = _positive_int(config, "hidden_size", where)
    heads = _positive_int(config, "num_attention_heads", where)
    layers = _positive_int(config, "num_hidden_layers", where)
    ffn = _positive_int(config, "intermediate_size", where)
    kv_heads = config.get("num_key_value_heads") or heads
    if not (
        isinstance(kv_heads, int)
        and not isinstance(kv_heads, bool)
        and kv_heads > 0
        and heads % kv_heads == 0
    ):
        raise ModelError(
            f"{where}: num_key_value_heads is {_shown(config.get('num_key_value_heads'))}; it must be a positive "
            f"integer that divides num_attention_heads ({heads}); {_RESAVE_CONFIG}"
        )
    if config.get("head_dim") is not None:
        head_dim = _positive_int(config, "head_dim", where)
    elif hidden % heads:
        raise ModelError(
            f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} and there is no "
            f"head_dim; {_RESAVE_CONFIG}"
        )
    else:
        head_dim = hidden // heads
    if head_dim % 2:
        raise ModelError(
            f"{where}: the head size {head_dim} is odd; rotary embeddings rotate pairs; {_RESAVE_CONFIG}"
        )
    context = _positive_int(config, "max_position_embeddings", where, default=2048)
    rms_eps = _positive_number(config.get("rms_norm_eps", 1e-6), "rms_norm_eps", where)
    theta, scaling = rope_parameters(base)
    hparams = HParams(context, hidden, ffn, layers, heads, kv_heads, head_dim, rms_eps, theta, scaling)
    _check_shapes(base, hparams)
    return hparams


def _check_shapes(base: BaseModel, h: HParams) -> None:
    where = _config_file(base)
    found = {int(m[1]) for key in base.shapes if (m := re.match(r"model\.layers\.(\d+)\.", key))}
    if found != set(range(h.layers)):
        held = f"layers {min(found)}-{max(found)}" if found else "no layers"
        raise ModelError(
            f"{where}: num_hidden_layers is {h.layers} but the weights hold {held}; this config.json is "
            "not the weights' (copy the whole model folder)"
        )
    q, kv = h.heads * h.head_dim, h.kv_heads * h.head_dim
    expected = {"model.embed_tokens.weight": (None, h.hidden), "lm_head.weight": (None, h.hidden)}
    for i in range(h.layers):
        layer = f"model.layers.{i}."
        expected |= {
            f"{layer}self_attn.q_proj.weight": (q, h.hidden),
            f"{layer}self_attn.k_proj.weight": (kv, h.hidden),
            f"{layer}self_attn.v_proj.weight": (kv, h.hidden),
            f"{layer}self_attn.o_proj.weight": (h.hidden, q),
            f"{layer}mlp.gate_proj.weight": (h.ffn, h.hidden),
            f"{layer}mlp.up_proj.weight": (h.ffn, h.hidden),
            f"{layer}mlp.down_proj.weight": (h.hidden, h.ffn),
            f"{layer}input_layernorm.weight": (h.hidden,),
            f"{layer}post_attention_layernorm.weight": (h.hidden,),
        }
    for key, shape in expected.items():
        have = base.shapes.get(key)
        if have is None:
            if key == "lm_head.weight":
                continue  # tied to the embedding
            raise ModelError(f"{base.folder}: the weights have no {key}; copy the whole model folder")
        if len(have) != len(shape) or any(
            want is not None and want != got for want, got in zip(shape, have, strict=True)
        ):
            sizes = (
                f"hidden_size {h.hidden}, num_attention_heads {h.heads}, num_key_value_heads {h.kv_heads}, "
                f"head size {h.head_dim}, intermediate_size {h.ffn}"
            )
            raise ModelError(
                f"{where}: {key} has shape {list(have)}, which {sizes} do not give; this config.json is not "
                "the weights' (copy the whole model folder)"
            )


def rope_parameters(base: BaseModel) -> tuple[float, dict]:
    """(RoPE base, scaling) from config.json, in either transformers 4's or 5's spelling."""
    config, where = base.config, _config_file(base)
    params = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if value is not None and not isinstance(value, dict):
            raise ModelError(f"{where}: {key} is {_shown(value)}, not an object or null; {_RESAVE_CONFIG}")
        params.update(value or {})
    theta = _positive_number(params.get("rope_theta", config.get("rope_theta", 10000.0)), "rope_theta", where)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return theta, {}
    if kind in ("linear", "yarn") and "factor" in params:
        scaling = {
            **params,
            "type": kind,
            "factor": _positive_number(params["factor"], "the RoPE factor", where),
        }
        original = params.get("original_max_position_embeddings")
        if kind == "yarn" and original is not None:
            _positive_int(params, "original_max_position_embeddings", where)
        return theta, scaling
    raise ModelError(
        f"{where}: RoPE scaling {_shown(kind)}; llama-sft export writes none, linear or yarn "
        "scaling (with a 'factor'); convert this model with llama.cpp's convert_hf_to_gguf.py"
    )


def write_hparams(writer: gguf.GGUFWriter, base: BaseModel, rows: int, outtype: str, name: str) -> None:
    h = read_hparams(base)
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(h.context)
    writer.add_embedding_length(h.hidden)
    writer.add_feed_forward_length(h.ffn)
    writer.add_block_count(h.layers)
    writer.add_head_count(h.heads)
    writer.add_head_count_kv(h.kv_heads)
    if h.head_dim * h.heads != h.hidden:
        writer.add_key_length(h.head_dim)
        writer.add_value_length(h.head_dim)
    writer.add_rope_dimension_count(h.head_dim)
    writer.add_layer_norm_rms_eps(h.rms_eps)
    writer.add_vocab_size(rows)
    writer.add_rope_freq_base(h.rope_theta)
    if h.rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType(h.rope_scaling["type"]))
        writer.add_rope_scaling_factor(h.rope_scaling["factor"])
        if h.rope_scaling["type"] == "yarn":
            original = h.rope_scaling.get("original_max_position_embeddings")
            if original:
                writer.add_rope_scaling_orig_ctx_len(int(original))


# ---------------------------------------------------------------------------------------------
# Vocabulary


@dataclass
class Vocabulary:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int | None
    add_bos: bool
    add_space_prefix: bool


def _model_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def check_sentencepiece(tokenizer: TextTokenizer | None, where: Path):
    """The tokenizer's SentencePiece model, if llama.cpp's "llama" tokenizer reproduces it."""
    supported = (
        "llama-sft export writes SentencePiece vocabularies (tokenizer.model: LLaMA's 32000 pieces, "
        "Chinese-LLaMA's 49953, Chinese-Alpaca's 49954, Chinese-LLaMA-2's 55296)"
    )
    if tokenizer is None:
        raise ModelError(
            f"{where}: no tokenizer in the LoRA folders or the base model; {supported}: put one there"
        )
    if tokenizer.sp is None:
        raise ModelError(
            f"{tokenizer.directory}: has tokenizer.json but no {SP_MODEL}; {supported}: put the "
            f"{SP_MODEL} the model was trained with in this folder"
        )
    model_file = tokenizer.directory / SP_MODEL
    proto = _model_proto(model_file)
    kind = proto.trainer_spec.model_type
    normalizer = proto.normalizer_spec
    # llama.cpp reproduces SentencePiece's BPE segmentation by piece scores, without normalisation.
    if kind != proto.trainer_spec.BPE:
        raise ModelError(
            f"{model_file}: a SentencePiece {proto.trainer_spec.ModelType.Name(kind)} model; llama.cpp "
            "tokenizes like SentencePiece only for BPE models (as LLaMA's); export a model with a BPE tokenizer"
        )
    if normalizer.name not in ("identity", "") or normalizer.remove_extra_whitespaces:
        raise ModelError(
            f"{model_file}: normalizes text ({normalizer.name}, remove_extra_whitespaces "
            f"{normalizer.remove_extra_whitespaces}); llama.cpp does not, so it would tokenize differently. "
            "Train the tokenizer with normalization_rule_name=identity as LLaMA's is"
        )
    return proto


def read_vocabulary(tokenizer: TextTokenizer, rows: int) -> Vocabulary:
    """The model's ``rows`` tokens as llama.cpp's SentencePiece ("llama") vocabulary."""
    proto = check_sentencepiece(tokenizer, tokenizer.directory)
    normalizer = proto.normalizer_spec
    sp = tokenizer.sp
    tokens, scores, types = [], [], []
    for piece in proto.pieces:
        tokens.append(piece.piece.encode("utf-8"))
        scores.append(piece.score)
        # SentencePiece's piece types are numbered as gguf.TokenType (normal 1 ... byte 6).
        types.append(int(gguf.TokenType(piece.type)))
    for content, token_id in sorted(tokenizer.added.items(), key=lambda kv: kv[1]):
        if token_id < rows:
            assert token_id == len(tokens), "added tokens follow the SentencePiece pieces"
            tokens.append(content.encode("utf-8"))
            scores.append(-1000.0)
            # A special token: matched only where special tokens are parsed, as SentencePiece never matches it.
            types.append(int(gguf.TokenType.CONTROL))
    for filler in range(len(tokens), rows):
        tokens.append(f"[PAD{filler}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    add_bos = tokenizer.config.get("add_bos_token", True)
    return Vocabulary(
        tokens=tokens,
        scores=scores,
        types=types,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        unk_id=sp.unk_id(),
        pad_id=tokenizer.pad_id if tokenizer.pad_id < rows else None,
        add_bos=bool(add_bos) if isinstance(add_bos, bool) else True,
        add_space_prefix=normalizer.add_dummy_prefix,
    )


def write_vocabulary(writer: gguf.GGUFWriter, vocab: Vocabulary) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    if vocab.pad_id is not None:
        writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(vocab.add_space_prefix)


# ---------------------------------------------------------------------------------------------
# Tensors


@dataclass
class TensorPlan:
    key: str  # the Hugging Face name
    name: str  # the GGUF name
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    permute_heads: int | None  # q/k: the head count their rows are grouped by

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size


def plan_tensors(base: BaseModel, shapes: dict[str, tuple[int, ...]], outtype: str) -> list[TensorPlan]:
    h = read_hparams(base)
    heads, kv_heads = h.heads, h.kv_heads
    names = gguf.get_tensor_name_map(ARCH, h.layers)
    plans = []
    for path in base.files:
        for key in base.keys[path]:
            if key.endswith(SKIPPED_SUFFIXES):
                continue
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ModelError(
                    f"{path}: holds {key}, which llama.cpp's LLaMA graph has no place for; "
                    "export a plain LlamaForCausalLM model"
                )
            shape = shapes[key]
            qtype = QTYPES[outtype]
            if len(shape) == 1:
                qtype = gguf.GGMLQuantizationType.F32  # norms stay float32
            elif qtype == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % 32:
                qtype = gguf.GGMLQuantizationType.F16
            permute = heads if key.endswith("self_attn.q_proj.weight") else None
            permute = kv_heads if key.endswith("self_attn.k_proj.weight") else permute
            plans.append(TensorPlan(key, name, shape, qtype, permute))
    return plans


# Rows converted at a time: a float32 copy of the whole embedding (55296 x 4096) would be 900 MB.
CHUNK_BYTES = 16 * 2**20
SAME_TYPE = {gguf.GGMLQuantizationType.F32: torch.float32, gguf.GGMLQuantizationType.F16: torch.float16}


# The largest magnitude each output type holds: f16's 65504, and in q8_0 a block's scale (its largest
# magnitude / 127) is an f16; bf16 has float32's exponent but rounds up to infinity a little earlier.
LIMITS = {
    gguf.GGMLQuantizationType.F32: float(np.finfo(np.float32).max),
    gguf.GGMLQuantizationType.BF16: 3.38e38,
    gguf.GGMLQuantizationType.F16: 65504.0,
    gguf.GGMLQuantizationType.Q8_0: 65504.0 * 127,
}


class NotRepresentable(ValueError):
    """A tensor holds NaN, infinity, or a value the output type cannot hold (``export`` names the source)."""


def _check_range(block: torch.Tensor, plan: TensorPlan) -> None:
    largest = float(block.abs().max()) if block.numel() else 0.0
    if not largest <= LIMITS[plan.qtype]:  # also false for NaN
        raise NotRepresentable(f"largest magnitude {largest:.3g}")


def convert(tensor: torch.Tensor, plan: TensorPlan) -> np.ndarray:
    """The tensor's data as ``plan.qtype``, by the gguf package's quantisers, a block of rows at a
    time so that only the output and one block are held besides the (memory-mapped) input. Raises
    ``NotRepresentable`` for NaN, infinity or a value beyond the type's range (f16: 65504)."""
    if plan.permute_heads is not None:
        # Hugging Face keeps each head's rotary halves apart; llama.cpp rotates adjacent pairs (Meta's order).
        tensor = unpermute(tensor, plan.permute_heads)
    tensor = tensor.detach()
    rows = tensor.reshape(-1, tensor.shape[-1])
    step = max(1, CHUNK_BYTES // (4 * rows.shape[1]))
    if SAME_TYPE.get(plan.qtype) == tensor.dtype:
        for start in range(0, rows.shape[0], step):
            _check_range(rows[start : start + step], plan)
        return tensor.contiguous().numpy()  # already in the file's type: written from the mapping as it is
    out = None
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step].to(torch.float32)
        _check_range(chunk, plan)
        block = gguf.quants.quantize(chunk.numpy(), plan.qtype)
        if out is None:
            out = np.empty((rows.shape[0], block.shape[1]), dtype=block.dtype)
        out[start : start + step] = block
    return out.reshape(*tensor.shape[:-1], out.shape[-1])


def iter_tensors(base: BaseModel, adapters: list[Adapter], plans: list[TensorPlan]):
    """(plan, merged tensor), in plan order, one base file open at a time."""
    by_key = {plan.key: plan for plan in plans}
    for path in base.files:
        with open_weights(path) as get:
            for key in base.keys[path]:
                if key in by_key:
                    yield by_key[key], merged_tensor(key, get(key), adapters)


# ---------------------------------------------------------------------------------------------
# Ollama


def _go_literal(text: str) -> str:
    """Text as it must appear in a Go template to come out unchanged."""
    return text.replace("{{", '{{ "{{" }}')


def _go_prompt(prompt: str, system: str) -> str:
    out = []
    for number, part in enumerate(prompt.split("{instruction}")):
        if number:
            out.append("{{ .Content }}")
        pieces = part.split("{system_prompt}")
        out.append(f"{{{{ {system} }}}}".join(_go_literal(piece) for piece in pieces))
    return "".join(out)


def _go_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a Go string literal


def ollama_template(template: Template, eos: str, bos: str = "<s>") -> str:
    """The prompt template in Ollama's Go template language, laying out a conversation as the
    Jinja ``chat_template`` (and so ``prompt_ids``) does: the first prompt (its system prompt from a
    system message or the template's), each answer after a space where the prompt does not end in
    whitespace, then the end-of-turn token, and BOS + the follow-up prompt for each later turn. The
    first BOS is not written: Ollama adds it, as the GGUF's add-BOS flag says. No action trims
    (``{{-``): the text around them, trailing spaces included, is the prompt's own."""
    followup = template.followup_prompt if template.followup_prompt is not None else template.prompt
    no_system = getattr(template, "prompt_no_system", None)
    end = getattr(template, "end_of_turn", None) or eos
    after = getattr(template, "after_answer", "") or ""
    later_bos = bos if getattr(template, "bos", "every_turn") == "every_turn" else ""
    space = "" if template.prompt[-1:].isspace() else " "
    if template.system_prompt is None:
        first = _go_prompt(template.prompt, "$system")
        if no_system is not None:
            first = (
                f"{{{{ if $system }}}}{first}{{{{ else }}}}{_go_prompt(no_system, '$system')}{{{{ end }}}}"
            )
        system = '{{ $system := "" }}'
    else:
        first = _go_prompt(template.prompt, "$system")
        system = f"{{{{ $system := {_go_string(template.system_prompt)} }}}}"
    return (
        f"{system}{{{{ if .System }}}}{{{{ $system = .System }}}}{{{{ end }}}}"
        "{{ $first := true }}"
        "{{ range .Messages }}"
        '{{ if eq .Role "user" }}'
        f"{{{{ if $first }}}}{first}"
        f"{{{{ else }}}}{_go_literal(later_bos)}{_go_prompt(followup, '$system')}{{{{ end }}}}"
        "{{ $first = false }}"
        f'{{{{ else if eq .Role "assistant" }}}}{space}{{{{ .Content }}}}{_go_literal(end + after)}'
        "{{ end }}{{ end }}"
    )


def stop_strings(template: Template, eos: str) -> list[str]:
    """The end-of-turn token (and EOS, when the template ends turns with another token), and the
    start of the next instruction (the last line before ``{instruction}`` in the follow-up prompt),
    so a model that runs on into a new turn stops."""
    followup = template.followup_prompt if template.followup_prompt is not None else template.prompt
    lead = [line.strip() for line in followup.split("{instruction}")[0].splitlines() if line.strip()]
    stops = [getattr(template, "end_of_turn", None) or eos]
    if eos not in stops:
        stops.append(eos)
    if lead and "{system_prompt}" not in lead[-1]:
        stops.append(lead[-1])
    return stops


def modelfile(gguf_name: str, template: Template, eos: str, bos: str = "<s>") -> str:
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{ollama_template(template, eos, bos)}"""']
    lines += [f"PARAMETER stop {_go_string(stop)}" for stop in stop_strings(template, eos)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# llama.cpp: its quantizer, and its perplexity on held-out text (--check)


def llama_cpp_binding(what: str):
    """llama-cpp-python, or an ExportError saying how to install it (``what`` names the flag value)."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(f"{what} {LLAMA_CPP_MISSING}") from None
    return llama_cpp


@contextmanager
def c_stderr_captured():
    """File descriptor 2 redirected to a temporary file, for C code that prints there (llama.cpp's
    loader and quantizer report every tensor); yields a list that holds the text afterwards."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


def quantize(source: Path, target: Path, outtype: str) -> None:
    """``target`` as ``outtype`` made by llama.cpp's own quantizer from the float GGUF ``source``.
    llama.cpp chooses the type per tensor: a k-quant needs rows of 256 values, and a narrower matrix
    gets the nearest legacy type whose blocks fit (q5_0, q5_1, q8_0) or stays f16."""
    llama_cpp = llama_cpp_binding(f"--outtype {outtype}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[outtype])
    with c_stderr_captured() as log:
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(target).encode(), ctypes.byref(params)
        )
    if status != 0:
        lines = [line for line in log[0].splitlines() if line.strip()]
        if any("No space left" in line for line in lines):
            raise OSError(errno.ENOSPC, "No space left on device")
        reason = lines[-1].strip() if lines else f"status {status}"
        raise ExportError(f"{target.name}: llama.cpp's quantizer could not make {outtype}: {reason}")


def _has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def load_gguf(path: Path, **settings):
    """``llama_cpp.Llama`` on the file, quietly. On CPUs with AMX, llama.cpp's repacked copy of Q8_0
    weights crashes this build, so weight repacking is turned off there (llama.cpp's --no-repack),
    through the binding's default-parameters function when it has that field."""
    llama_cpp = llama_cpp_binding("--check")
    from llama_cpp import llama as module

    defaults = module.llama_cpp.llama_model_default_params
    if _has_amx():
        if hasattr(defaults(), "use_extra_bufts"):

            def no_repack():
                params = defaults()
                params.use_extra_bufts = False
                return params

            module.llama_cpp.llama_model_default_params = no_repack
        else:
            logger.info("this llama-cpp-python cannot turn weight repacking off; q8_0 may fail on AMX CPUs")
    try:
        with c_stderr_captured():
            return llama_cpp.Llama(str(path), verbose=False, **settings)
    finally:
        module.llama_cpp.llama_model_default_params = defaults


def read_check_blocks(
    text: str | Path, tokenizer: TextTokenizer, block_size: int, count: int
) -> list[list[int]]:
    """The first ``count`` blocks of ``block_size`` ids of the text at ``text``, the blocks
    ``llama-sft eval --task perplexity`` scores (each file read and cut as ``pretrain`` does), so a
    GGUF's perplexity here and the model's there are measured on the same tokens."""
    if block_size < 2:
        raise ExportError(f"--check_block_size {block_size}: a block needs at least 2 tokens; use 512")
    if count < 1:
        raise ExportError(f"--check_blocks {count}: give 1 or more")
    try:
        found = text_blocks(tokenizer, text, block_size)
    except DataError as exc:
        # The readers are pretrain's and eval's, whose flags are --dataset_dir and --block_size.
        message = str(exc).replace("--dataset_dir", "--check").replace("--block_size", "--check_block_size")
        raise DataError(message) from None
    return [block for _, blocks in found for block in blocks][:count]


@dataclass
class Scores:
    """What llama.cpp predicts for held-out blocks: the negative log-likelihood of each next token,
    summed, over ``positions``, and its top-1 choice at every position."""

    nll: float
    positions: int
    top1: np.ndarray

    @property
    def perplexity(self) -> float:
        return perplexity_result([("blocks", self.nll, self.positions)])["overall"]["perplexity"]


def gguf_scores(path: Path, blocks: list[list[int]]) -> Scores:
    """Each block evaluated by llama.cpp from an empty context (n_ctx = the block), every position's
    logits kept: the next-token loss of positions 0..n-2 and the top-1 token of each."""
    size = len(blocks[0])
    llm = load_gguf(path, n_ctx=size, n_batch=size, n_ubatch=size, logits_all=True)
    nll, positions, top1 = 0.0, 0, []
    try:
        for ids in blocks:
            llm.reset()
            llm.eval(ids)
            logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
            peak = logits.max(axis=1, keepdims=True)
            log_norm = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
            targets = np.asarray(ids[1:])
            nll += float((log_norm - logits[np.arange(len(targets)), targets]).sum())
            positions += len(targets)
            top1.append(logits.argmax(axis=1))
    finally:
        llm.close()
    return Scores(nll, positions, np.concatenate(top1))


def check_files(files: dict[str, Path], reference: Path, blocks: list[list[int]]) -> list[dict]:
    """Perplexity of each file on the blocks, and how often its top-1 token is the float file's."""
    expected = gguf_scores(reference, blocks)
    rows = []
    for outtype, path in files.items():
        got = expected if path == reference else gguf_scores(path, blocks)
        rows.append(
            {
                "outtype": outtype,
                "file": path.name,
                "bytes": path.stat().st_size,
                "perplexity": got.perplexity,
                "top1_agreement": float((got.top1 == expected.top1).mean()),
            }
        )
    return rows


def check_table(rows: list[dict], reference: str, blocks: list[list[int]]) -> str:
    lines = [
        f"llama.cpp on {len(blocks)} held-out blocks of {len(blocks[0])} tokens; "
        f"top-1 agreement against {reference}",
        f"{'outtype':<8} {'MiB':>9} {'perplexity':>11} {'agreement':>10}",
    ]
    for row in rows:
        lines.append(
            f"{row['outtype']:<8} {row['bytes'] / 2**20:>9.2f} {row['perplexity']:>11.3f} "
            f"{row['top1_agreement']:>10.2%}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def parse_outtypes(outtype: str | list[str]) -> list[str]:
    """``--outtype``: one type, or a comma-separated list (each written once, in the order given)."""
    given = outtype.split(",") if isinstance(outtype, str) else list(outtype)
    outtypes = list(dict.fromkeys(item.strip() for item in given))
    for item in outtypes:
        if item not in OUTTYPES:
            raise ExportError(
                f"--outtype {item!r}: choose one of {', '.join(OUTTYPES)}, or a comma-separated list"
            )
    return outtypes


def output_paths(out: Path, outtypes: list[str]) -> dict[str, Path]:
    """One type: ``--output_file`` itself; a list: NAME.TYPE.gguf beside it for each type."""
    if len(outtypes) == 1:
        return {outtypes[0]: out}
    return {outtype: out.with_name(f"{out.stem}.{outtype}.gguf") for outtype in outtypes}


def check_report_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.check.json")


def modelfile_path(output_file: Path) -> Path:
    return output_file.with_name(f"{output_file.stem}.Modelfile")


def _check_output(out: Path, overwrite: bool) -> None:
    if out.suffix != ".gguf":
        raise ExportError(
            f"--output_file {out}: name the file NAME.gguf (llama.cpp and Ollama look for .gguf)"
        )
    for path in (out, modelfile_path(out)):
        if path.is_dir():
            raise ExportError(
                f"--output_file {path}: is a folder; give a file name such as {path}/model.gguf"
            )
        if path.exists() and not overwrite:
            raise ExportError(
                f"{path}: already exists; pass --overwrite to replace it, or choose another --output_file"
            )
    if not out.parent.is_dir():
        raise ExportError(f"--output_file {out}: the folder {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise ExportError(f"--output_file {out}: the folder {out.parent} is not writable; choose another")


def _check_disk(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out.parent).free
    if free < needed + DISK_MARGIN:
        raise ExportError(
            f"{out}: needs about {needed / 2**30:.2f} GiB but {out.parent} has {free / 2**30:.2f} GiB free; "
            "free some space or choose another --output_file"
        )


def _not_representable(
    base: BaseModel, adapters: list[Adapter], plan: TensorPlan, outtype: str, exc: NotRepresentable
) -> ModelError:
    changed_by = [str(a.weights_file) for a in adapters if plan.key in a.ops]
    if changed_by:
        where = f"{', '.join(changed_by)}: {plan.key}, merged,"
        fix = "check lora_alpha and r in adapter_config.json (alpha is usually 1-4x r)"
    else:
        where = f"{next(p for p in base.files if plan.key in base.keys[p])}: {plan.key}"
        fix = "the weights are damaged, or were trained in a wider type"
    if outtype in ("f16", "q8_0"):
        fix += "; --outtype bf16 or f32 hold values beyond f16's 65504"
    return ModelError(f"{where} holds NaN, infinity or a value {outtype} cannot hold ({exc}); {fix}")


def export(
    base_model: str | Path,
    lora_models: list[str | Path] = (),
    output_file: str | Path = "model.gguf",
    outtype: str | list[str] = "f16",
    overwrite: bool = False,
    prompt_template: str | None = None,
    check: str | Path | None = None,
    check_block_size: int = 512,
    check_blocks: int = 16,
) -> Path:
    """The GGUF file written (the first, for a list of types: ``export_files`` returns them all)."""
    return next(iter(export_files(**locals()).values()))


def export_files(
    base_model: str | Path,
    lora_models: list[str | Path] = (),
    output_file: str | Path = "model.gguf",
    outtype: str | list[str] = "f16",
    overwrite: bool = False,
    prompt_template: str | None = None,
    check: str | Path | None = None,
    check_block_size: int = 512,
    check_blocks: int = 16,
) -> dict[str, Path]:
    """Every type in ``outtype`` from one pass over the weights: the types the gguf package writes
    (f32, f16, bf16, q8_0) are written as the tensors stream by, and llama.cpp's quantizer then makes
    each of ``LLAMA_CPP_TYPES`` from the float file. With ``check`` (text files, as ``pretrain`` reads
    them), each file's perplexity and top-1 agreement with the float file on held-out blocks is
    printed and written to NAME.check.json."""
    outtypes = parse_outtypes(outtype)
    quantized = [t for t in outtypes if t in LLAMA_CPP_TYPES]
    if quantized:
        llama_cpp_binding(f"--outtype {quantized[0]}")
    if check is not None:
        llama_cpp_binding("--check")
    out = Path(output_file)
    if out.suffix != ".gguf":
        raise ExportError(
            f"--output_file {out}: name the file NAME.gguf (llama.cpp and Ollama look for .gguf)"
        )
    targets = output_paths(out, outtypes)
    for path in targets.values():
        _check_output(path, overwrite)
    report = check_report_path(out)
    if check is not None and report.exists() and not overwrite:
        raise ExportError(
            f"{report}: already exists; pass --overwrite to replace it, or choose another --output_file"
        )
    base = read_base_model(base_model)
    check_architecture(base)
    adapters = [read_adapter(folder, base) for folder in lora_models]
    # The kind of tokenizer first: no vocabulary size can make a tokenizer.json-only one exportable.
    given = next((a.tokenizer for a in reversed(adapters) if a.tokenizer is not None), None)
    if given is None and has_tokenizer(base.folder):
        given = TextTokenizer.load(base.folder)
    check_sentencepiece(given, Path(lora_models[-1]) if lora_models else base.folder)
    shapes = plan_shapes(base, adapters)
    rows = shapes[EMBED_KEY][0]
    tokenizer = output_tokenizer(base, adapters, rows)
    vocab = read_vocabulary(tokenizer, rows)
    template = resolve_template(prompt_template, [a.folder for a in adapters], base.folder)
    # A template that ends answers with its own token (chatml's <|im_end|>) needs it in the vocabulary.
    template.end_id(tokenizer)
    if template.bos == "none":
        # Training put no BOS before such prompts; llama.cpp and Ollama add one when the flag says so.
        vocab.add_bos = False
    blocks = None
    if check is not None:
        context = read_hparams(base).context
        blocks = read_check_blocks(check, tokenizer, min(check_block_size, context), check_blocks)

    written = [t for t in outtypes if t in QTYPES]
    source = next((t for t in FLOAT_SOURCES if t in written), None)
    pid = os.getpid()
    temporary_source = None
    if source is None and (quantized or check is not None):
        source = "f16"
        temporary_source = out.with_name(f".{out.stem}.f16-source.tmp-{pid}.gguf")
    plans = {
        t: plan_tensors(base, shapes, t) for t in dict.fromkeys([*written, *([source] if source else [])])
    }
    vocab_bytes = sum(map(len, vocab.tokens)) + len(vocab.tokens) * 16
    needed = sum(sum(plan.nbytes for plan in plans[t]) + vocab_bytes for t in plans)
    # A quantized file is at most a q8_0 one: llama.cpp falls back to q8_0 or f16 where q8_0 would.
    needed += len(quantized) * (sum(plan.nbytes for plan in plan_tensors(base, shapes, "q8_0")) + vocab_bytes)
    _check_disk(out, needed)
    if notice := lora_server_notice(adapters, base.folder):
        logger.info(notice)

    name = Path(lora_models[-1]).name if lora_models else base.folder.name
    temps = {t: path.with_name(f".{path.name}.tmp-{pid}") for t, path in targets.items()}
    if temporary_source is not None:
        temps[source] = temporary_source
    temp_modelfiles = {
        t: path.with_name(f".{modelfile_path(path).name}.tmp-{pid}") for t, path in targets.items()
    }
    writers = {}
    logger.info(
        "exporting %s%s to %s (%s, %d tensors, about %.1f MB)",
        base.folder,
        "".join(f" + {a.folder}" for a in adapters),
        ", ".join(str(p) for p in targets.values()),
        ",".join(outtypes),
        len(next(iter(plans.values()))),
        needed / 2**20,
    )
    try:
        for t in plans:
            writer = writers[t] = gguf.GGUFWriter(None, ARCH_NAME)
            write_hparams(writer, base, rows, t, name)
            write_vocabulary(writer, vocab)
            writer.add_chat_template(template.chat_template())
            for plan in plans[t]:
                writer.add_tensor_info(
                    plan.name, plan.shape, np.dtype(np.float32), plan.nbytes, raw_dtype=plan.qtype
                )
            writer.open_output_file(temps[t])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        by_key = {t: {plan.key: plan for plan in plans[t]} for t in plans}
        first = next(iter(plans))
        # One pass over the weights: each merged tensor goes to every file before the next is read.
        for plan, tensor in iter_tensors(base, adapters, plans[first]):
            for t, writer in writers.items():
                this = by_key[t][plan.key]
                try:
                    data = convert(tensor, this)
                except NotRepresentable as exc:
                    raise _not_representable(base, adapters, this, t, exc) from None
                writer.write_tensor_data(data)
        for writer in writers.values():
            writer.close()
        for t in quantized:
            quantize(temps[source], temps[t], t)
        eos, bos = (vocab.tokens[i].decode() for i in (vocab.eos_id, vocab.bos_id))
        for t, path in targets.items():
            temp_modelfiles[t].write_text(modelfile(path.name, template, eos, bos))
        for t, path in targets.items():
            os.replace(temps[t], path)
            os.replace(temp_modelfiles[t], modelfile_path(path))
        if blocks is not None:
            reference = targets[source] if temporary_source is None else temporary_source
            rows_checked = check_files(targets, reference, blocks)
            label = source if temporary_source is None else f"{source} (written for the check, removed)"
            table = check_table(rows_checked, label, blocks)
            print(table)
            result = {
                "text": str(check),
                "blocks": len(blocks),
                "block_size": len(blocks[0]),
                "reference": label,
                "files": rows_checked,
            }
            temp_report = report.with_name(f".{report.name}.tmp-{pid}")
            temp_report.write_text(json.dumps(result, indent=2) + "\n")
            os.replace(temp_report, report)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ExportError(
                f"{out}: the disk filled up while writing; free some space or choose another --output_file"
            ) from None
        raise
    finally:
        for writer in writers.values():
            writer.close()
        for path in [
            *temps.values(),
            *temp_modelfiles.values(),
            report.with_name(f".{report.name}.tmp-{pid}"),
        ]:
            path.unlink(missing_ok=True)
    for path in targets.values():
        logger.info("wrote %s (%.1f MB) and %s", path, path.stat().st_size / 2**20, modelfile_path(path).name)
    return targets


OPTIONS = (
    (
        "--base_model",
        {"required": True, "help": "Hugging Face LLaMA folder: the base, or a merged/full model."},
    ),
    (
        "--output_file",
        {
            "required": True,
            "help": "The .gguf file to write (OUT.Modelfile beside it); NAME.TYPE.gguf for a list.",
        },
    ),
    (
        "--outtype",
        {
            "default": "f16",
            "help": f"Tensor type: {', '.join(QTYPES)} (the gguf package), {', '.join(LLAMA_CPP_TYPES)} "
            "(llama.cpp's quantizer, from the float file), or a comma-separated list (default f16).",
        },
    ),
    (
        "--prompt_template",
        {"help": "Template name or JSON file. Default: template.json of the last LoRA, then the model's."},
    ),
    ("--overwrite", {"action": "store_true", "help": "Replace an existing output file (and its Modelfile)."}),
    (
        "--check",
        {
            "help": "Held-out text (a .txt/.jsonl file or folder, read as pretrain reads it): report each file's "
            "perplexity in llama.cpp and its top-1 agreement with the float file (NAME.check.json)."
        },
    ),
    ("--check_block_size", {"type": int, "default": 512, "help": "Tokens a --check block (default 512)."}),
    (
        "--check_blocks",
        {"type": int, "default": 16, "help": "Blocks --check evaluates at most (default 16)."},
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-sft export",
        description="Write a GGUF file for llama.cpp and Ollama from a base model plus LoRAs, or a merged model.",
    )
    add_config(parser)
    for flag, settings in OPTIONS:
        parser.add_argument(flag, **settings)
    add_lora_model(parser, "LoRA folder(s) folded in.")
    return parser


def main(argv: list[str]) -> None:
    args = parse_command(build_parser(), argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        files = export_files(
            args.base_model,
            args.lora_model,
            args.output_file,
            args.outtype,
            args.overwrite,
            args.prompt_template,
            args.check,
            args.check_block_size,
            args.check_blocks,
        )
    except (ModelError, ExportError, TokenizerError, TemplateError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    for out in files.values():
        print(f"GGUF written to {out}; Ollama: ollama create NAME -f {modelfile_path(out)}")
