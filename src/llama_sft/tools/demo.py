"""The built-in demo: everything generated here, nothing downloaded.

``make_tokenizer`` trains a small SentencePiece model (LLaMA-style: BPE, byte fallback, BOS 1,
EOS 2), ``make_model`` builds a small random LLaMA, ``make_demo_data`` writes a bilingual word
translation task in Alpaca format whose held-out instructions pair a known word with a phrasing
not seen for it. ``run_demo`` trains through the same ``train()`` that ``run_sft.sh`` runs and
reports exact-match accuracy on the held-out instructions before and after.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
import torch

from ..data.records import Record
from ..data.templates import Template, load_template
from ..data.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

WORDS = {
    "red": "红色", "blue": "蓝色", "green": "绿色", "yellow": "黄色", "black": "黑色", "white": "白色",
    "one": "一", "two": "二", "three": "三", "four": "四", "five": "五", "six": "六", "seven": "七",
    "eight": "八", "nine": "九", "ten": "十", "cat": "猫", "dog": "狗", "horse": "马", "bird": "鸟",
    "fish": "鱼", "cow": "牛", "sheep": "羊", "tiger": "老虎", "water": "水", "fire": "火",
    "mountain": "山", "river": "河", "sun": "太阳", "moon": "月亮",
}  # fmt: skip
TO_CHINESE = (
    "Translate to Chinese: {w}",
    "What is {w} in Chinese?",
    "把这个英文词翻译成中文：{w}",
    "Give the Chinese word for {w}.",
)
TO_ENGLISH = (
    "Translate to English: {w}",
    "What is {w} in English?",
    "把这个中文词翻译成英文：{w}",
    "Give the English word for {w}.",
)


def demo_records(seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, held out). Every held-out pair's word is trained in the same direction with other phrasings."""
    rng = random.Random(seed)
    train, held = [], []
    for en, zh in WORDS.items():
        for phrasings, word, answer in ((TO_CHINESE, en, zh), (TO_ENGLISH, zh, en)):
            hold = rng.randrange(len(phrasings))
            for k, phrasing in enumerate(phrasings):
                record = Record(instruction=phrasing.format(w=word), input="", output=answer)
                (held if k == hold and rng.random() < 0.35 else train).append(record)
    rng.shuffle(train)
    return train, held


def write_alpaca(records: list[Record], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": r.instruction, "input": r.input, "output": r.output} for r in records]
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def make_tokenizer(
    folder: Path, texts: list[str], vocab_size: int = 400, with_pad: bool = True, symbols: Sequence[str] = ()
) -> TextTokenizer:
    """Train a LLaMA-style SentencePiece model on ``texts`` and write a tokenizer folder; ``symbols``
    (such as chatml's ``<|im_end|>``) become pieces of their own."""
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(folder / "tokenizer"),
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=(["<pad>"] if with_pad else []) + list(symbols),
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    if with_pad:
        (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    tokenizer = TextTokenizer.load(folder)
    tokenizer.save(folder)
    return TextTokenizer.load(folder)


def make_model(
    folder: Path,
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    seed: int = 0,
    max_positions: int = 2048,
) -> None:
    """A random LLaMA saved in Hugging Face format (safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(str(folder))


@torch.no_grad()
def greedy_answer(
    model, tokenizer: TextTokenizer, template: Template, instruction: str, max_new_tokens: int = 16
) -> str:
    ids = [tokenizer.bos_id] + tokenizer.encode(template.render(instruction))
    device = next(model.parameters()).device
    output = model.generate(
        input_ids=torch.tensor([ids], device=device),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    return tokenizer.decode(output[0, len(ids) :].tolist()).strip()


def exact_match(
    model, tokenizer, template, records: list[Record]
) -> tuple[float, list[tuple[str, str, str]]]:
    answers = [
        (r.instruction, r.output, greedy_answer(model, tokenizer, template, r.full_instruction))
        for r in records
    ]
    return sum(a == b for _, a, b in answers) / len(records), answers


def demo_train_argv(root: Path, steps: int) -> list[str]:
    """The run_sft.sh command, at demo size."""
    return [
        "--model_name_or_path", str(root / "base_model"),
        "--tokenizer_name_or_path", str(root / "tokenizer"),
        "--dataset_dir", str(root / "data" / "train"),
        "--validation_file", str(root / "data" / "eval.json"),
        "--data_cache_dir", str(root / "data_cache"),
        "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "16",
        "--do_train", "--do_eval",
        "--seed", "42",
        "--fp16",
        "--max_steps", str(steps),
        "--lr_scheduler_type", "cosine",
        "--learning_rate", "3e-3",
        "--warmup_ratio", "0.03",
        "--weight_decay", "0",
        "--logging_strategy", "steps",
        "--logging_steps", "20",
        "--save_strategy", "steps",
        "--save_total_limit", "2",
        "--evaluation_strategy", "steps",
        "--eval_steps", "100",
        "--save_steps", "100",
        "--gradient_accumulation_steps", "1",
        "--preprocessing_num_workers", "2",
        "--max_seq_length", "128",
        "--output_dir", str(root / "output"),
        "--overwrite_output_dir",
        "--ddp_timeout", "30000",
        "--logging_first_step", "True",
        "--lora_rank", "16",
        "--lora_alpha", "32",
        "--trainable", "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj",
        "--modules_to_save", "embed_tokens,lm_head",
        "--lora_dropout", "0.05",
        "--torch_dtype", "float16",
        "--report_to", "none",
    ]  # fmt: skip


def build_demo(root: Path) -> tuple[list[Record], list[Record]]:
    train, held = demo_records()
    write_alpaca(train, root / "data" / "train" / "train.json")
    write_alpaca(held, root / "data" / "eval.json")
    # Plain text for `run_pt.sh` / `llama-sft pretrain`: each instruction and its answer, a document a line.
    (root / "data" / "pt").mkdir(parents=True, exist_ok=True)
    lines = [f"{r.full_instruction} {r.output}".replace("\n", " ") for r in train + held]
    (root / "data" / "pt" / "demo.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    template = load_template("alpaca")
    texts = [template.render(r.full_instruction) + " " + r.output for r in train + held] * 4
    tokenizer = make_tokenizer(root / "tokenizer", texts)
    make_model(root / "base_model", len(tokenizer), hidden=128, layers=4, heads=4)
    return train, held


def run_demo(root: str | Path = "demo_output", steps: int = 400) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..training.run import train

    root = Path(root)
    start = time.time()
    for generated in ("data", "tokenizer", "base_model", "output"):
        # The demo owns these folders; stale checkpoints from an earlier demo would be resumed.
        shutil.rmtree(root / generated, ignore_errors=True)
    train_records, held = build_demo(root)
    tokenizer = TextTokenizer.load(root / "tokenizer")
    template = load_template("alpaca")
    print(
        f"demo data: {len(train_records)} training and {len(held)} held-out instructions in {root / 'data'}"
    )
    base = AutoModelForCausalLM.from_pretrained(str(root / "base_model")).eval()
    before, _ = exact_match(base, tokenizer, template, held)
    print(f"exact match on held-out instructions before training: {before:.0%}")

    lora_dir = train(demo_train_argv(root, steps))

    history = json.loads((root / "output" / "trainer_state.json").read_text())["log_history"]
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(root / "base_model")), str(lora_dir)
    )
    after, answers = exact_match(tuned.eval(), tokenizer, template, held)
    print(
        "\nloss: "
        + " -> ".join(f"{loss:.2f} (step {step})" for step, loss in losses[:: max(1, len(losses) // 6)])
    )
    print(f"exact match on held-out instructions: before {before:.0%}, after {after:.0%}")
    for instruction, expected, got in answers[:6]:
        print(f"  {instruction!r} -> {got!r} (expected {expected!r})")
    print(f"\nLoRA ready for merging: {lora_dir}\nloss curve: {root / 'output' / 'loss_curve.png'}")
    print(f"demo finished in {time.time() - start:.0f} s")
    return {"before": before, "after": after, "lora_dir": str(lora_dir), "losses": losses}
