"""Stage 3: text -> token ids, exactly as the base model was trained.

Contract: ``TextTokenizer.load(folder)``; ``encode(text)`` returns ids without special tokens;
``bos_id``/``eos_id``/``pad_id`` are ints and ``pad_id != eos_id``; ``len(tok)`` counts every id
the model must have an embedding row for; ``save(folder)`` writes files that both this class and
``transformers.AutoTokenizer`` load with the same special ids.

A folder with ``tokenizer.model`` is encoded by SentencePiece itself. transformers 5 converts
such a model into a BPE tokenizer that ranks merges differently; with extended vocabularies whose
added pieces all share one score (Chinese-LLaMA) it segments Chinese differently (说/是指 where
SentencePiece gives 说是/指), which is not the tokenization the model was trained with. A folder
with only ``tokenizer.json`` is encoded by the tokenizers library.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import sentencepiece as spm

logger = logging.getLogger(__name__)

SP_MODEL = "tokenizer.model"
HF_JSON = "tokenizer.json"
PAD_PIECE = "<pad>"
# Text that exercises the places where the two segmenters are known to part ways.
PROBE_TEXTS = (
    "我们说是指一个人在社会中的地位。",
    "Below is an instruction that describes a task.\n\n### Response: 中文和English混合 123。",
)


class TokenizerError(ValueError):
    pass


def _token_content(value: object) -> str | None:
    """A token's text in tokenizer_config.json or special_tokens_map.json; None when it holds none, or
    lone surrogates that no tokenizer can look up or write back."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad UTF-8 or JSON, a number of 4300+ digits
        raise TokenizerError(
            f"{path}: cannot read ({exc}); restore the file from the tokenizer's source"
        ) from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


class TextTokenizer:
    def __init__(self, directory: Path, sp: spm.SentencePieceProcessor | None, hf=None):
        self.directory = directory
        self.sp = sp
        self.hf = hf
        self.config = _read_json(directory / "tokenizer_config.json")
        self.special_map = _read_json(directory / "special_tokens_map.json")
        self.added: dict[str, int] = {}
        self.added_pad = False
        if sp is not None:
            self.base_size = sp.get_piece_size()
            for id_text, token in self._added_tokens_decoder().items():
                if int(id_text) >= self.base_size:
                    self.added[_token_content(token)] = int(id_text)
            self.bos_id, self.eos_id = sp.bos_id(), sp.eos_id()
            self.pad_id = self._find_sp_pad()
        else:
            self.base_size = len(hf)
            self.bos_id, self.eos_id = hf.bos_token_id, hf.eos_token_id
            self.pad_id = hf.pad_token_id
            if self.pad_id is None or self.pad_id == self.eos_id:
                hf.add_special_tokens({"pad_token": PAD_PIECE})
                self.pad_id = hf.pad_token_id
                self.added_pad = True
        if self.bos_id is None or self.bos_id < 0 or self.eos_id is None or self.eos_id < 0:
            raise TokenizerError(
                f"{directory}: the tokenizer defines no BOS or EOS token; LLaMA models need both"
            )

    def _added_tokens_decoder(self) -> dict:
        decoder = self.config.get("added_tokens_decoder") or {}
        entries = decoder.items() if isinstance(decoder, dict) else [("", decoder)]
        for id_text, token in entries:
            if not id_text.isdecimal() or _token_content(token) is None:
                raise TokenizerError(
                    f"{self.directory / 'tokenizer_config.json'}: added_tokens_decoder must map token ids to "
                    f"tokens, found {id_text[:20]!r}: {str(token)[:40]!r}; restore the file from the tokenizer's source"
                )
        return decoder

    def _find_sp_pad(self) -> int:
        declared = self.special_map.get("pad_token") or self.config.get("pad_token")
        content = _token_content(declared)
        if declared is not None and content is None:
            raise TokenizerError(
                f"{self.directory}: the pad_token {str(declared)[:40]!r} is not a token's text; restore "
                "tokenizer_config.json and special_tokens_map.json from the tokenizer's source"
            )
        if content is not None:
            if content in self.added:
                return self.added[content]
            piece_id = self.sp.piece_to_id(content)
            if piece_id not in (self.sp.unk_id(), self.sp.eos_id()):
                return piece_id
        if self.sp.pad_id() >= 0:
            return self.sp.pad_id()
        # No pad token: add one rather than reuse EOS, whose label would then be masked out and the
        # model would never learn to stop.
        new_id = self.base_size + len(self.added)
        self.added[PAD_PIECE] = new_id
        self.added_pad = True
        return new_id

    @classmethod
    def load(cls, directory: str | Path) -> TextTokenizer:
        directory = Path(directory)
        if directory.is_file() and directory.name == SP_MODEL:
            directory = directory.parent
        if not directory.is_dir():
            raise TokenizerError(f"{directory}: tokenizer folder not found (--tokenizer_name_or_path)")
        if (directory / SP_MODEL).is_file():
            sp = spm.SentencePieceProcessor()
            try:
                sp.load(str(directory / SP_MODEL))
            except (OSError, RuntimeError) as exc:
                raise TokenizerError(f"{directory / SP_MODEL}: not a SentencePiece model ({exc})") from None
            return cls(directory, sp)
        if (directory / HF_JSON).is_file():
            from transformers import AutoTokenizer

            try:
                hf = AutoTokenizer.from_pretrained(str(directory))
            except Exception as exc:
                raise TokenizerError(f"{directory / HF_JSON}: transformers cannot load it ({exc})") from None
            return cls(directory, None, hf)
        raise TokenizerError(
            f"{directory}: no {SP_MODEL} or {HF_JSON}; point --tokenizer_name_or_path at the folder "
            "holding the tokenizer files"
        )

    def __len__(self) -> int:
        return self.base_size + len(self.added)

    def encode(self, text: str) -> list[int]:
        if self.sp is not None:
            return self.sp.encode(text)
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.sp is not None:
            return self.sp.encode(texts)
        return self.hf(texts, add_special_tokens=False)["input_ids"]

    def token_id(self, text: str) -> int | None:
        """The id of a token written as ``text`` (a special token such as ``<|im_end|>``), or None
        when the vocabulary has no such single token."""
        if text in self.added:
            return self.added[text]
        if self.sp is not None:
            piece_id = self.sp.piece_to_id(text)
            return (
                None if piece_id == self.sp.unk_id() and text != self.sp.id_to_piece(piece_id) else piece_id
            )
        return self.hf.get_vocab().get(text)

    def decode(self, ids: list[int]) -> str:
        if self.sp is not None:
            return self.sp.decode([i for i in ids if i < self.base_size])
        return self.hf.decode(ids, skip_special_tokens=True)

    def mismatches_with_transformers(self) -> int | None:
        """How many probe texts transformers' own tokenizer segments differently (None: not comparable)."""
        if self.sp is None:
            return None
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(self.directory))
        except Exception:
            return None
        return sum(hf(t, add_special_tokens=False)["input_ids"] != self.encode(t) for t in PROBE_TEXTS)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.sp is None:
            self.hf.save_pretrained(str(directory))
            return
        if (directory / SP_MODEL).resolve() != (self.directory / SP_MODEL).resolve():
            shutil.copyfile(self.directory / SP_MODEL, directory / SP_MODEL)
        pad = self.sp.id_to_piece(self.pad_id) if self.pad_id < self.base_size else PAD_PIECE
        special = {
            "bos_token": self.sp.id_to_piece(self.bos_id),
            "eos_token": self.sp.id_to_piece(self.eos_id),
            "unk_token": self.sp.id_to_piece(self.sp.unk_id()),
            "pad_token": pad,
        }
        config = {k: v for k, v in self.config.items() if k not in ("added_tokens_decoder", "pad_token")}
        config.update(special)
        config.setdefault("tokenizer_class", "LlamaTokenizer")
        config.setdefault("add_bos_token", True)
        config.setdefault("add_eos_token", False)
        config["added_tokens_decoder"] = {
            str(token_id): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for content, token_id in sorted(self.added.items(), key=lambda kv: kv[1])
        }
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, ensure_ascii=False, indent=2) + "\n"
        )
        (directory / "special_tokens_map.json").write_text(
            json.dumps(special, ensure_ascii=False, indent=2) + "\n"
        )
