"""The original Chinese-LLaMA-Alpaca command lines (v1 and v2 run_sft.sh and run_pt.sh) and every flag
of their run_clm_*_with_peft.py: each parses, the published lines train, and each flag that changes
nothing here says why in one line."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from conftest import ROOT, SMALL_RECORDS, corpus

from llama_sft.data.encode import encode_cached
from llama_sft.data.pretrain import BlockDataset, build_blocks, find_text_files
from llama_sft.data.records import Record
from llama_sft.data.templates import load_template
from llama_sft.training import run
from llama_sft.training.args import NO_EFFECT, ArgumentError, ignored_flag_notices, parse_train_args
from llama_sft.training.command_line import main
from llama_sft.training.flags import translate_legacy
from llama_sft.training.precision import Machine

DS_CONFIG = str(ROOT / "scripts" / "training" / "ds_zero2_no_offload.json")
TRAINABLE = "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj"

# The published command lines, their shell variables as words in capitals ($RANDOM a fixed seed).
V2_SFT = f"""
--deepspeed DS --model_name_or_path MODEL --tokenizer_name_or_path TOKENIZER --dataset_dir SFT_DATA
--per_device_train_batch_size 1 --per_device_eval_batch_size 1 --do_train --do_eval --seed 1234 --fp16
--num_train_epochs 1 --lr_scheduler_type cosine --learning_rate 1e-4 --warmup_ratio 0.03 --weight_decay 0
--logging_strategy steps --logging_steps 10 --save_strategy steps --save_total_limit 3
--evaluation_strategy steps --eval_steps 100 --save_steps 200 --gradient_accumulation_steps 1
--preprocessing_num_workers 8 --max_seq_length 512 --output_dir OUT --overwrite_output_dir
--ddp_timeout 30000 --logging_first_step True --lora_rank 8 --lora_alpha 32 --trainable {TRAINABLE}
--lora_dropout 0.05 --modules_to_save embed_tokens,lm_head --torch_dtype float16 --validation_file VALIDATION
--load_in_kbits 16 --save_safetensors False --gradient_checkpointing --ddp_find_unused_parameters False
""".split()
V1_SFT = f"""
--deepspeed DS --model_name_or_path MODEL --tokenizer_name_or_path TOKENIZER --dataset_dir SFT_DATA
--validation_split_percentage 0.001 --per_device_train_batch_size 1 --per_device_eval_batch_size 1
--do_train --do_eval --seed 1234 --fp16 --num_train_epochs 1 --lr_scheduler_type cosine --learning_rate 1e-4
--warmup_ratio 0.03 --weight_decay 0 --logging_strategy steps --logging_steps 10 --save_strategy steps
--save_total_limit 3 --evaluation_strategy steps --eval_steps 100 --save_steps 200
--gradient_accumulation_steps 1 --preprocessing_num_workers 8 --max_seq_length 512 --output_dir OUT
--overwrite_output_dir --ddp_timeout 30000 --logging_first_step True --lora_rank 8 --lora_alpha 32
--trainable {TRAINABLE} --modules_to_save embed_tokens,lm_head --lora_dropout 0.05 --torch_dtype float16
--validation_file VALIDATION --peft_path PEFT --gradient_checkpointing --ddp_find_unused_parameters False
""".split()
V2_PT = f"""
--deepspeed DS --model_name_or_path MODEL --tokenizer_name_or_path TOKENIZER --dataset_dir PT_DATA
--data_cache_dir CACHE --validation_split_percentage 0.001 --per_device_train_batch_size 1 --do_train
--seed 1234 --fp16 --num_train_epochs 1 --lr_scheduler_type cosine --learning_rate 2e-4 --warmup_ratio 0.05
--weight_decay 0.01 --logging_strategy steps --logging_steps 10 --save_strategy steps --save_total_limit 3
--save_steps 200 --gradient_accumulation_steps 1 --preprocessing_num_workers 8 --block_size 512
--output_dir OUT --overwrite_output_dir --ddp_timeout 30000 --logging_first_step True --lora_rank 8
--lora_alpha 32 --trainable {TRAINABLE} --modules_to_save embed_tokens,lm_head --lora_dropout 0.05
--torch_dtype float16 --load_in_kbits 16 --save_safetensors False --gradient_checkpointing
--ddp_find_unused_parameters False
""".split()
V1_PT = " ".join(V2_PT)
for _v2_only in ("--load_in_kbits 16 ", "--save_safetensors False ", "--gradient_checkpointing "):
    V1_PT = V1_PT.replace(_v2_only, "")
V1_PT = V1_PT.split() + ["--peft_path", "PEFT"]
PUBLISHED = {"v2 run_sft.sh": V2_SFT, "v1 run_sft.sh": V1_SFT, "v2 run_pt.sh": V2_PT, "v1 run_pt.sh": V1_PT}

# The other flags of run_clm_*_with_peft.py (v1 and v2), with a value each may be given.
EXTRA = {
    "use_flash_attention_2": "True",
    "flash_attn": "True",
    "overwrite_cache": "True",
    "max_train_samples": "8",
    "max_eval_samples": "2",
    "keep_linebreaks": "True",
    "streaming": "True",
    "full_finetuning": "False",
    "load_in_kbits": "16",
    "double_quant": "True",
    "quant_type": "nf4",
    "low_cpu_mem_usage": "True",
    "cache_dir": "hub_cache",
    "model_revision": "main",
    "use_auth_token": "False",
    "use_fast_tokenizer": "True",
    "config_name": "config.json",
    "config_overrides": "n_embd=10,resid_pdrop=0.2",
    "data_cache_dir": "cache",
    "block_size": "512",
    "validation_split_percentage": "0.001",
    "validation_file": "eval.json",
    "preprocessing_num_workers": "8",
    "peft_path": "lora",
    "trainable": "q_proj,v_proj",
    "lora_rank": "8",
    "lora_alpha": "32",
    "lora_dropout": "0.05",
    "modules_to_save": "embed_tokens,lm_head",
    "debug_mode": "False",
    "torch_dtype": "float16",
}
NO_EFFECT_FLAGS = [name for _, name, _ in NO_EFFECT]
CPU = Machine(cuda=False, cpu="Test CPU", bf16_fast=False, bf16_why="test", under_torchrun=False)


def filled(words: list[str], **paths) -> list[str]:
    return [str(paths.get(word, word)) for word in words]


def extra_argv(names) -> list[str]:
    return [arg for name in names for arg in (f"--{name}", EXTRA[name])]


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_command_lines_parse_as_written(name):
    argv = filled(PUBLISHED[name], DS=DS_CONFIG)
    args = parse_train_args(argv, CPU)
    assert args.training.deepspeed == DS_CONFIG and args.lora.modules_to_save_list == [
        "embed_tokens",
        "lm_head",
    ]
    assert args.requested["fp16"] is True and args.requested["torch_dtype"] == "float16"
    assert ignored_flag_notices(args, "pt") == []


@pytest.mark.parametrize("name", list(EXTRA))
def test_every_flag_of_the_original_scripts_parses(name):
    base = ["--model_name_or_path", "M", "--output_dir", "O"]
    args = parse_train_args(base + extra_argv([name]))
    values = {**vars(args.model), **vars(args.data), **vars(args.lora), **vars(args.training)}
    if name in ("use_flash_attention_2", "flash_attn"):
        assert args.model.attn_implementation == "flash_attention_2"
    else:
        given = EXTRA[name]
        expected = {"True": True, "False": False}.get(given, given)
        assert str(values[name]) == str(expected) or values[name] == pytest.approx(float(given))
    notices = ignored_flag_notices(args, "pt")
    if name in NO_EFFECT_FLAGS:
        assert len(notices) == 1 and notices[0].startswith(f"--{name} {values[name]}: no effect here; ")
    else:
        assert notices == []


def test_switches_bare_or_with_a_value():
    base = ["--model_name_or_path", "M"]
    for flag in (
        "--streaming",
        "--keep_linebreaks",
        "--use_fast_tokenizer",
        "--low_cpu_mem_usage",
        "--debug_mode",
    ):
        name = flag[2:]
        bare = parse_train_args(base + [flag, "--seed", "3"])
        off = parse_train_args(base + [flag, "false"])
        untouched = parse_train_args(base)
        group = "model" if hasattr(bare.model, name) else "data" if hasattr(bare.data, name) else "training"
        assert [getattr(getattr(a, group), name) for a in (bare, off, untouched)] == [True, False, None]
        assert bare.training.seed == 3


def test_each_no_effect_notice_is_one_line_and_task_aware():
    argv = ["--model_name_or_path", "M", *extra_argv(NO_EFFECT_FLAGS)]
    args = parse_train_args(argv)
    for task in ("sft", "pt"):
        notices = ignored_flag_notices(args, task)
        assert [line.split(" ", 1)[0] for line in notices] == [f"--{name}" for name in NO_EFFECT_FLAGS]
        assert all("\n" not in line and ": no effect here; " in line for line in notices)
    pretraining = dict(zip(NO_EFFECT_FLAGS, ignored_flag_notices(args, "pt"), strict=True))
    tuning = dict(zip(NO_EFFECT_FLAGS, ignored_flag_notices(args, "sft"), strict=True))
    assert "memory-mapped token cache" in pretraining["streaming"] and "read whole" in tuning["streaming"]
    assert "ended by EOS" in pretraining["keep_linebreaks"] and "records" in tuning["keep_linebreaks"]
    assert "--debug_errors" in pretraining["debug_mode"]


def test_flash_attention_where_it_can_run_and_sdpa_elsewhere(caplog):
    assert translate_legacy(["--flash_attn"]) == ["--attn_implementation", "flash_attention_2"]
    assert translate_legacy(["--use_flash_attention_2", "False", "--seed", "1"]) == ["--seed", "1"]
    assert translate_legacy(["--use_flash_attention_2=yes"]) == ["--attn_implementation", "flash_attention_2"]
    with pytest.raises(ArgumentError, match="--flash_attn maybe: give True or False"):
        translate_legacy(["--flash_attn", "maybe"])
    base = ["--model_name_or_path", "M", "--output_dir", "O"]
    with_flash = Machine(True, "Test CPU", False, "test", False, flash_attn=True)
    without_package = Machine(True, "Test CPU", False, "test", False, flash_attn=False)
    for flag in ("--use_flash_attention_2", "--flash_attn"):
        assert parse_train_args([*base, flag], with_flash).model.attn_implementation == "flash_attention_2"
        for machine, why in (
            (CPU, "no CUDA GPU here"),
            (without_package, "flash-attn package is not installed"),
        ):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="llama_sft"):
                args = parse_train_args([*base, flag, "True"], machine)
            assert args.model.attn_implementation == "sdpa"
            assert args.requested["attn_implementation"] == "flash_attention_2"
            lines = [r.getMessage() for r in caplog.records if "flash_attention_2" in r.getMessage()]
            assert len(lines) == 1 and why in lines[0] and "sdpa instead" in lines[0]


def test_max_samples_are_the_first_of_a_seeded_shuffle():
    records = [Record(f"q{i}", "", f"a{i}") for i in range(20)]
    first, stats = run.sample_records(records, 5, seed=7)
    again, _ = run.sample_records(records, 5, seed=7)
    other, _ = run.sample_records(records, 5, seed=8)
    assert first == again != other and stats == {"limit": 5, "available": 20, "used": 5}
    assert [records.index(r) for r in first] == sorted(records.index(r) for r in first)
    assert run.sample_records(records, 50, seed=7) == (records, {"limit": 50, "available": 20, "used": 20})
    blocks = BlockDataset(np.arange(40), 2)  # 20 blocks
    train, held = blocks.split(0.25)
    picked = train.sample(4, seed=7)
    assert len(picked) == 4 and list(picked.blocks) == sorted(picked.blocks)
    assert set(picked.blocks) <= set(train.blocks) and not set(picked.blocks) & set(held.blocks)
    assert list(train.sample(4, seed=7).blocks) == list(picked.blocks) != list(train.sample(4, seed=8).blocks)
    assert picked[0]["input_ids"] == [2 * int(picked.blocks[0]), 2 * int(picked.blocks[0]) + 1]
    assert train.sample(100, seed=7) is train


def test_overwrite_cache_rebuilds_the_entry(tokenizer, tmp_path):
    data = tmp_path / "a.json"
    data.write_text(json.dumps(SMALL_RECORDS))
    records = [Record(r["instruction"], r.get("input", ""), r["output"]) for r in SMALL_RECORDS]
    template, cache = load_template("alpaca"), tmp_path / "cache"
    _, _, cached = encode_cached(records, [data], template, tokenizer, 64, cache)
    (entry,) = cache.glob("encoded-*.npz")
    os.utime(entry, (0, 0))
    _, _, cached_again = encode_cached(records, [data], template, tokenizer, 64, cache)
    rebuilt, _, from_cache = encode_cached(records, [data], template, tokenizer, 64, cache, overwrite=True)
    assert (cached, cached_again, from_cache) == (False, True, False) and entry.stat().st_mtime > 0
    assert len(rebuilt) == len(records)

    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("\n".join(corpus()[:20]) + "\n", encoding="utf-8")
    files = find_text_files(text)
    first, _, cached = build_blocks(files, tokenizer, 16, cache)
    (tokens,) = cache.glob("pretrain-*.tokens")
    os.utime(tokens, (0, 0))
    second, _, cached_again = build_blocks(files, tokenizer, 16, cache)
    third, _, from_cache = build_blocks(files, tokenizer, 16, cache, overwrite=True)
    assert (cached, cached_again, from_cache) == (False, True, False) and tokens.stat().st_mtime > 0
    assert first[3] == second[3] == third[3]


def notice_lines(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"--{name} ")]


def flash_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("flash_attention_2 (")]


@pytest.fixture
def world(model_dir, tokenizer_dir, data_dir, tmp_path, monkeypatch):
    """The published lines' inputs at test size; the SFT lines give no --data_cache_dir, so the default
    cache is moved under tmp_path."""
    monkeypatch.setattr(run, "DEFAULT_CACHE", tmp_path / "default_cache")
    text = tmp_path / "pt"
    text.mkdir()
    (text / "a.txt").write_text("\n".join(corpus()) + "\n", encoding="utf-8")
    return {
        "MODEL": model_dir,
        "TOKENIZER": tokenizer_dir,
        "SFT_DATA": data_dir / "train",
        "VALIDATION": data_dir / "eval.json",
        "PT_DATA": text,
        "CACHE": tmp_path / "cache",
    }


def as_run_here(words: list[str]) -> list[str]:
    """A published line as it runs in this process: one optimizer step, no progress bars, no reports.
    --deepspeed needs torchrun's processes (test_distributed.py and test_run_pt_sh_runs_the_documented_command
    run it); here its word pair is left out."""
    at = words.index("--deepspeed")
    return [
        *words[:at],
        *words[at + 2 :],
        "--max_steps",
        "1",
        "--report_to",
        "none",
        "--disable_tqdm",
        "True",
    ]


def run_line(words: list[str], task: str, caplog) -> None:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llama_sft"):
        main(as_run_here(words), task=task)


def test_sft_lines_of_both_versions_train_with_every_extra_flag(world, tmp_path, caplog):
    v2_out, v1_out = tmp_path / "v2", tmp_path / "v1"
    given = [
        *NO_EFFECT_FLAGS,
        "use_flash_attention_2",
        "overwrite_cache",
        "max_train_samples",
        "max_eval_samples",
        "full_finetuning",
        "double_quant",
        "quant_type",
    ]
    run_line(filled(V2_SFT, OUT=v2_out, **world) + extra_argv(given), "sft", caplog)
    lora = v2_out / "sft_lora_model"
    assert (lora / "adapter_model.bin").is_file() and (lora / "adapter_config.json").is_file()
    for name in NO_EFFECT_FLAGS:
        assert len(notice_lines(caplog, name)) == 1, name
    assert len(flash_lines(caplog)) == 1
    stats = json.loads((v2_out / "data_stats.json").read_text())
    assert stats["max_samples"] == {
        "train": {"limit": 8, "available": 16, "used": 8},
        "eval": {"limit": 2, "available": 4, "used": 2},
    }
    assert stats["train"]["whole"] == 8 and stats["eval"]["whole"] == 2
    ran = json.loads((lora / "training_args.json").read_text())
    assert ran["model"]["attn_implementation"] == "sdpa"
    assert ran["requested"]["attn_implementation"] == "flash_attention_2"

    # v1, continuing the LoRA v2 wrote (--peft_path), with v1's own flash-attention switch.
    run_line(filled(V1_SFT, OUT=v1_out, PEFT=lora, **world) + ["--flash_attn", "True"], "sft", caplog)
    assert (v1_out / "sft_lora_model" / "adapter_model.safetensors").is_file()
    assert len(flash_lines(caplog)) == 1
    assert not any(notice_lines(caplog, name) for name in NO_EFFECT_FLAGS)
    assert "max_samples" not in json.loads((v1_out / "data_stats.json").read_text())


def test_pt_lines_of_both_versions_train_with_every_extra_flag(world, tmp_path, caplog):
    v2_out, v1_out = tmp_path / "v2", tmp_path / "v1"
    extra = extra_argv([*NO_EFFECT_FLAGS, "flash_attn", "overwrite_cache"]) + ["--max_train_samples", "2"]
    run_line(filled(V2_PT, OUT=v2_out, **world) + extra, "pt", caplog)
    lora = v2_out / "pt_lora_model"
    assert (lora / "adapter_model.bin").is_file()
    for name in NO_EFFECT_FLAGS:
        assert len(notice_lines(caplog, name)) == 1, name
    assert "memory-mapped token cache" in notice_lines(caplog, "streaming")[0]
    assert len(flash_lines(caplog)) == 1
    stats = json.loads((v2_out / "data_stats.json").read_text())
    blocks = stats["train"]["blocks"]
    assert blocks > 2 and stats["max_samples"] == {"train": {"limit": 2, "available": blocks, "used": 2}}
    assert any(
        f"--max_train_samples 2: train on 2 of the {blocks} blocks" in r.getMessage() for r in caplog.records
    )

    run_line(filled(V1_PT, OUT=v1_out, PEFT=lora, **world) + ["--flash_attn"], "pt", caplog)
    assert (v1_out / "pt_lora_model" / "adapter_model.safetensors").is_file()
    assert len(flash_lines(caplog)) == 1
    assert not any(notice_lines(caplog, name) for name in NO_EFFECT_FLAGS)
