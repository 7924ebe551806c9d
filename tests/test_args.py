"""One set of typed arguments behind both entry points: documented flags, YAML configs, renamed flags."""

from __future__ import annotations

import pytest
from conftest import ROOT

from llama_sft.training.args import ArgumentError, parse_train_args

DS_CONFIG = str(ROOT / "scripts" / "training" / "ds_zero2_no_offload.json")

DOCUMENTED = """
--deepspeed ds_zero2_no_offload.json --model_name_or_path M --tokenizer_name_or_path T --dataset_dir D
--validation_split_percentage 0.001 --per_device_train_batch_size 1 --per_device_eval_batch_size 1
--do_train --do_eval --seed 1234 --fp16 --max_steps 100 --lr_scheduler_type cosine --learning_rate 1e-4
--warmup_ratio 0.03 --weight_decay 0 --logging_strategy steps --logging_steps 10 --save_strategy steps
--save_total_limit 3 --evaluation_strategy steps --eval_steps 100 --save_steps 200
--gradient_accumulation_steps 8 --preprocessing_num_workers 8 --max_seq_length 512 --output_dir O
--overwrite_output_dir --ddp_timeout 30000 --logging_first_step True --lora_rank 8 --lora_alpha 32
--trainable q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj --modules_to_save embed_tokens,lm_head
--lora_dropout 0.05 --torch_dtype float16 --validation_file V --peft_path P --gradient_checkpointing
--ddp_find_unused_parameters False
""".split()
DOCUMENTED[1] = DS_CONFIG


def test_every_documented_flag_parses():
    args = parse_train_args(DOCUMENTED)
    t = args.training
    assert t.deepspeed == DS_CONFIG and t.fp16 and t.do_train and t.do_eval
    assert t.eval_strategy == "steps" and t.warmup_steps == pytest.approx(0.03) and t.gradient_checkpointing
    assert t.overwrite_output_dir and t.ddp_find_unused_parameters is False and t.ddp_timeout == 30000
    assert (t.max_steps, t.gradient_accumulation_steps, t.save_total_limit, t.seed) == (100, 8, 3, 1234)
    assert args.lora.target_modules == [
        "q_proj",
        "v_proj",
        "k_proj",
        "o_proj",
        "gate_proj",
        "down_proj",
        "up_proj",
    ]
    assert args.lora.modules_to_save_list == ["embed_tokens", "lm_head"]
    assert (args.lora.lora_rank, args.lora.lora_alpha, args.lora.peft_path) == (8, 32, "P")
    assert (args.model.torch_dtype, args.data.max_seq_length, args.data.validation_file) == (
        "float16",
        512,
        "V",
    )
    assert args.data.preprocessing_num_workers == 8 and args.data.validation_split_percentage == 0.001


def test_yaml_config_then_flags_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "model_name_or_path: M\ndataset_dir: D\nlora_rank: 16\nmodules_to_save: null\nlearning_rate: 0.0002\n"
        "do_train: true\nreport_to: [tensorboard]\nprompt_template: llama2-chat\n"
    )
    args = parse_train_args(["--config", str(config), "--lora_rank", "32", "--output_dir", "O"])
    assert args.lora.lora_rank == 32 and args.training.learning_rate == 2e-4 and args.training.do_train
    assert args.lora.modules_to_save_list is None and args.data.prompt_template == "llama2-chat"
    assert args.training.report_to == ["tensorboard"]
    assert args.model.tokenizer_name_or_path == "M"


def test_modules_to_save_null_and_group_by_length():
    args = parse_train_args(["--model_name_or_path", "M", "--modules_to_save", "null", "--group_by_length"])
    assert args.lora.modules_to_save_list is None
    assert args.training.train_sampling_strategy == "group_by_length"
    for off in (["--group_by_length", "False"], ["--group_by_length=false"]):
        args = parse_train_args(["--model_name_or_path", "M", *off, "--lora_rank", "4"])
        assert args.training.train_sampling_strategy != "group_by_length" and args.lora.lora_rank == 4


def test_bad_config_and_missing_model(tmp_path):
    with pytest.raises(ArgumentError, match="required"):
        parse_train_args(["--dataset_dir", "D"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ArgumentError, match="bad.yaml: a --config file is a mapping"):
        parse_train_args(["--config", str(bad)])


def test_deepspeed_config_that_is_not_json(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{stage: 2")
    with pytest.raises(ArgumentError, match="deepspeed"):
        parse_train_args(["--model_name_or_path", "M", "--deepspeed", str(bad)])


def test_fp16_on_a_cpu_becomes_bfloat16_only_where_bfloat16_is_native(monkeypatch):
    """--fp16 on a CPU: bfloat16 (which the speed-ups then run as llama-sft's own autocast) where
    the CPU multiplies in bfloat16 natively, float32 where it would be emulated; with DeepSpeed,
    float32 always."""
    from llama_sft.training.precision import Machine

    base = ["--model_name_or_path", "M", "--output_dir", "O", "--dataset_dir", "D"]
    for native in (True, False):
        cpu = Machine(cuda=False, cpu="Test CPU", bf16_fast=native, bf16_why="test", under_torchrun=False)
        t = parse_train_args(base + ["--fp16", "--torch_dtype", "float16"], cpu)
        assert not t.training.fp16 and t.training.bf16 == native and t.training.use_cpu
        assert t.model.torch_dtype == ("bfloat16" if native else "float32")
        # What was asked is kept beside what runs.
        assert t.requested == {
            "fp16": True,
            "torch_dtype": "float16",
            "use_cpu": False,
            **({"bf16": False} if native else {}),
        }
        assert t.to_dict()["requested"]["fp16"] is True and t.to_dict()["training"]["fp16"] is False
        with_ds = parse_train_args(base + ["--fp16", "--deepspeed", DS_CONFIG], cpu)
        assert not with_ds.training.fp16 and not with_ds.training.bf16 and not with_ds.training.use_cpu
        # DeepSpeed runs without use_cpu, so pinning (for a device there is not) is turned off here.
        assert with_ds.requested == {"fp16": True, "dataloader_pin_memory": True}
        assert not with_ds.training.dataloader_pin_memory
    gpu = Machine(cuda=True, cpu="Test CPU", bf16_fast=False, bf16_why="test", under_torchrun=False)
    on_gpu = parse_train_args(base + ["--fp16", "--torch_dtype", "float16"], gpu)
    assert on_gpu.requested == {} and on_gpu.model.torch_dtype == "float16"


def test_config_yaml_is_read_once_and_flags_after_it_win(tmp_path):
    """--config is expanded in place: a flag before it is overridden by the file, one after it wins;
    the documented --gradient_checkpointing is taken as transformers 5's activation_checkpointing."""
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: M\nlora_rank: 16\nspeedups: 'off'\ngradient_checkpointing: true\n")
    args = parse_train_args(["--lora_rank", "4", "--config", str(config), "--output_dir", "O"])
    assert args.lora.lora_rank == 16 and args.training.speedups == "off"
    assert args.training.activation_checkpointing and args.training.gradient_checkpointing
    assert args.training.activation_checkpointing_kwargs == {"use_reentrant": False}
    args = parse_train_args(["--config", str(config), "--lora_rank", "4", "--output_dir", "O"])
    assert args.lora.lora_rank == 4


def test_native_bfloat16_is_read_from_the_cpu_flags(monkeypatch):
    """An x86 CPU without avx512_bf16 or amx_bf16 emulates bfloat16 (oneDNN still says it
    supports it): float32 there. Where there are no x86 flags, a timed probe decides."""
    from llama_sft.training import precision

    monkeypatch.delenv("LLAMA_SFT_CPU_BF16", raising=False)
    cases = {
        "avx2 avx512f avx512bw": False,
        "avx2 avx512f avx512_bf16": True,
        "avx2 avx512f amx_bf16 amx_tile": True,
        "avx2 fma": False,
    }
    for flags, fast in cases.items():
        precision.cpu_bf16_is_fast.cache_clear()
        monkeypatch.setattr(precision, "cpu_flags", lambda flags=flags: ("Test CPU", set(flags.split())))
        assert precision.cpu_bf16_is_fast()[0] is fast, flags
    precision.cpu_bf16_is_fast.cache_clear()
    monkeypatch.setattr(precision, "cpu_flags", lambda: ("Test ARM", {"fp", "asimd", "bf16"}))
    monkeypatch.setattr(precision, "_probe", lambda model, flags: (True, "probe"))
    assert precision.cpu_bf16_is_fast() == (True, "probe")
    monkeypatch.setenv("LLAMA_SFT_CPU_BF16", "0")
    precision.cpu_bf16_is_fast.cache_clear()
    assert precision.cpu_bf16_is_fast()[0] is False
    precision.cpu_bf16_is_fast.cache_clear()
