"""``llama-sft merge-tokenizer``: a LLaMA SentencePiece model + a Chinese one -> one extended tokenizer.

Contract: ``merge_tokenizers(llama_tokenizer_dir, chinese_sp_model_file, output_dir)`` keeps every
LLaMA piece at its id and appends, in the Chinese model's order, each of its normal pieces that
LLaMA lacks (type NORMAL, score 0). It writes ``output_dir/merged_tokenizer_sp/chinese_llama.model``
and ``output_dir/merged_tokenizer_hf/`` (``tokenizer.model``, ``tokenizer_config.json``,
``special_tokens_map.json``), which ``AutoTokenizer.from_pretrained`` and ``llama-sft train`` load.
The Hugging Face folder holds exactly the merged pieces (no pad token, as Chinese-LLaMA shipped);
training adds ``<pad>`` as the next id. Control, unknown and byte pieces of the Chinese model are not
copied: LLaMA has its own, and byte pieces are only meaningful at their fixed ids.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from ..data.tokenizer import SP_MODEL
from ..options import add_config, parse_command
from ..training.saving import atomic_dir

SP_DIR = "merged_tokenizer_sp"
HF_DIR = "merged_tokenizer_hf"
SP_NAME = "chinese_llama.model"
SAMPLE = (
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。人工智能是研究、开发用于模拟人的智能的理论和方法的科学。"
)
COPIED_TYPES = (
    sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL,
    sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED,
)


class TokenizerMergeError(ValueError):
    """Bad merge-tokenizer input. The message names the file or flag and says what to do."""


@dataclass
class MergeReport:
    llama_pieces: int
    added: int
    merged_pieces: int
    sp_model: Path
    hf_dir: Path


def _read_model(path: Path, flag: str) -> sentencepiece_model_pb2.ModelProto:
    if not path.is_file():
        raise TokenizerMergeError(f"{path}: {flag} file not found")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:
        raise TokenizerMergeError(f"{path}: not a SentencePiece model ({exc}); check {flag}") from None
    if not proto.pieces:
        raise TokenizerMergeError(f"{path}: a SentencePiece model with no pieces; check {flag}")
    return proto


def _llama_model_file(folder: Path) -> Path:
    if folder.is_file():
        return folder
    if not folder.is_dir():
        raise TokenizerMergeError(f"{folder}: --llama_tokenizer_dir is not a folder")
    path = folder / SP_MODEL
    if not path.is_file():
        raise TokenizerMergeError(
            f"{folder}: no {SP_MODEL} in --llama_tokenizer_dir; give the LLaMA tokenizer folder"
        )
    return path


def merged_proto(
    llama: sentencepiece_model_pb2.ModelProto, chinese: sentencepiece_model_pb2.ModelProto
) -> tuple[sentencepiece_model_pb2.ModelProto, int]:
    merged = sentencepiece_model_pb2.ModelProto()
    merged.CopyFrom(llama)
    present = {piece.piece for piece in merged.pieces}
    added = 0
    for piece in chinese.pieces:
        if piece.type not in COPIED_TYPES or piece.piece in present:
            continue
        new = sentencepiece_model_pb2.ModelProto.SentencePiece()
        new.piece, new.score, new.type = (
            piece.piece,
            0.0,
            sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL,
        )
        merged.pieces.append(new)
        present.add(piece.piece)
        added += 1
    return merged, added


def _write_hf_folder(
    folder: Path, model_bytes: bytes, sp: spm.SentencePieceProcessor, llama_dir: Path
) -> None:
    folder.mkdir()
    (folder / SP_MODEL).write_bytes(model_bytes)
    special = {
        "bos_token": sp.id_to_piece(sp.bos_id()),
        "eos_token": sp.id_to_piece(sp.eos_id()),
        "unk_token": sp.id_to_piece(sp.unk_id()),
    }
    config = {}
    source = llama_dir / "tokenizer_config.json" if llama_dir.is_dir() else None
    if source is not None and source.is_file():
        # Keep the LLaMA folder's own settings (model_max_length, legacy, ...); ids change, pieces don't.
        config = {
            k: v
            for k, v in json.loads(source.read_text(encoding="utf-8")).items()
            if k not in ("added_tokens_decoder", "pad_token", "tokenizer_file")
        }
    config.update(special)
    config.setdefault("tokenizer_class", "LlamaTokenizer")
    config.setdefault("add_bos_token", True)
    config.setdefault("add_eos_token", False)
    config.setdefault("clean_up_tokenization_spaces", False)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, ensure_ascii=False, indent=2) + "\n")


def merge_tokenizers(
    llama_tokenizer_dir: str | Path, chinese_sp_model_file: str | Path, output_dir: str | Path
) -> MergeReport:
    llama_dir = Path(llama_tokenizer_dir)
    llama = _read_model(_llama_model_file(llama_dir), "--llama_tokenizer_dir")
    chinese = _read_model(Path(chinese_sp_model_file), "--chinese_sp_model_file")
    merged, added = merged_proto(llama, chinese)
    model_bytes = merged.SerializeToString()
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model_bytes)
    out = Path(output_dir)
    for given in (llama_dir, Path(chinese_sp_model_file)):
        # The old --output_dir is deleted once the new one is complete: it must not hold an input.
        if out.resolve() in (given.resolve(), *given.resolve().parents):
            raise TokenizerMergeError(f"--output_dir {out} holds the input {given}; choose another folder")
    with atomic_dir(out) as staging:
        (staging / SP_DIR).mkdir()
        (staging / SP_DIR / SP_NAME).write_bytes(model_bytes)
        _write_hf_folder(staging / HF_DIR, model_bytes, sp, llama_dir)
    return MergeReport(len(llama.pieces), added, sp.get_piece_size(), out / SP_DIR / SP_NAME, out / HF_DIR)


def compare(llama_model: Path, merged_model: Path, text: str = SAMPLE) -> tuple[list[str], list[str]]:
    before, after = spm.SentencePieceProcessor(), spm.SentencePieceProcessor()
    before.load(str(llama_model))
    after.load(str(merged_model))
    return before.encode(text, out_type=str), after.encode(text, out_type=str)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-sft merge-tokenizer",
        description="Append a Chinese SentencePiece model's pieces to the LLaMA tokenizer.",
    )
    add_config(parser)
    parser.add_argument(
        "--llama_tokenizer_dir", required=True, help="Folder holding LLaMA's tokenizer.model."
    )
    parser.add_argument(
        "--chinese_sp_model_file", required=True, help="The Chinese SentencePiece .model file to merge in."
    )
    parser.add_argument(
        "--output_dir",
        default="merged_tokenizer",
        help=f"Gets {SP_DIR}/{SP_NAME} and {HF_DIR}/; replaced only once complete.",
    )
    parser.add_argument("--text", default=SAMPLE, help="Sentence to tokenize before and after, as a check.")
    return parser


def main(argv: list[str]) -> None:
    args = parse_command(build_parser(), argv)
    try:
        report = merge_tokenizers(args.llama_tokenizer_dir, args.chinese_sp_model_file, args.output_dir)
    except TokenizerMergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    before, after = compare(_llama_model_file(Path(args.llama_tokenizer_dir)), report.sp_model, args.text)
    print(
        f"LLaMA pieces: {report.llama_pieces}; added from the Chinese model: {report.added}; "
        f"merged: {report.merged_pieces}"
    )
    print(f"text: {args.text}")
    print(f"before ({len(before)} tokens): {before}")
    print(f"after ({len(after)} tokens): {after}")
    print(f"SentencePiece model: {report.sp_model}\nHugging Face tokenizer: {report.hf_dir}")
