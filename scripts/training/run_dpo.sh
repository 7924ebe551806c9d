#!/usr/bin/env bash
# Preference training (DPO, IPO, ORPO or SimPO) continuing an SFT LoRA: the step after run_sft.sh.
# Edit the parameters below (or set them in the environment). The defaults continue the LoRA that
# `make demo` trained, on pairs made from its data, so `bash scripts/training/run_dpo.sh` runs right
# after it. The result is ${output_dir}/dpo_lora_model: merge, export, chat and serve read it as they
# read sft_lora_model (it holds the SFT LoRA with the preference updates, for the same base model).
set -euo pipefail
cd "$(dirname "$0")"

########parameters########
lr=${lr:-5e-6}
pref_loss=${pref_loss:-sigmoid}  # sigmoid (DPO), ipo, orpo or simpo (orpo and simpo need no reference)
pref_beta=${pref_beta:-0.1}
simpo_gamma=${simpo_gamma:-0.5}
label_smoothing=${label_smoothing:-0}
pref_ftx=${pref_ftx:-0}  # weight of an SFT loss on the chosen answers

pretrained_model=${pretrained_model:-../../demo_output/base_model}
chinese_tokenizer_path=${chinese_tokenizer_path:-../../demo_output/tokenizer}
peft_model=${peft_model:-../../demo_output/output/sft_lora_model}  # empty: a new LoRA (e.g. on a merged model)
dataset_dir=${dataset_dir:-}  # preference files; empty: pairs made from the demo's data
validation_file=${validation_file:-}
per_device_train_batch_size=${per_device_train_batch_size:-2}
per_device_eval_batch_size=${per_device_eval_batch_size:-2}
training_steps=${training_steps:-100}
gradient_accumulation_steps=${gradient_accumulation_steps:-4}
max_seq_length=${max_seq_length:-512}
output_dir=${output_dir:-../../outputs/dpo}
deepspeed_config_file=${deepspeed_config_file:-ds_zero2_no_offload.json}
nproc_per_node=${nproc_per_node:-1}
load_in_kbits=${load_in_kbits:-16}  # 4 or 8: QLoRA over quantised base weights (bitsandbytes)
speedups=${speedups:-auto}  # auto: every speed-up that fits; off: stock transformers/PEFT training
########parameters########

# Without a dataset, demo pairs: each demo record's answer is chosen and another record's is rejected.
if [ -z "${dataset_dir}" ]; then
    dataset_dir=../../outputs/dpo_demo_pairs/train
    validation_file=${validation_file:-../../outputs/dpo_demo_pairs/eval.json}
    python - ../../demo_output/data "$(dirname "${dataset_dir}")" <<'EOF'
import json, sys
from pathlib import Path

source, target = Path(sys.argv[1]), Path(sys.argv[2])
for name, records in (("train/pairs.json", sorted((source / "train").glob("*.json"))), ("eval.json", [source / "eval.json"])):
    rows = [row for path in records for row in json.loads(path.read_text(encoding="utf-8"))]
    pairs = [
        {"instruction": row["instruction"], "input": row.get("input", ""), "chosen": row["output"], "rejected": other["output"]}
        for row, other in zip(rows, rows[1:] + rows[:1])
        if row["output"] != other["output"]
    ]
    (target / name).parent.mkdir(parents=True, exist_ok=True)
    (target / name).write_text(json.dumps(pairs, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
EOF
fi

optional=()
if [ -n "${peft_model}" ]; then
    optional+=(--peft_path "${peft_model}")
fi
if [ -n "${validation_file}" ]; then
    optional+=(--validation_file "${validation_file}")
fi

# The package from this checkout when it is not installed.
export PYTHONPATH="../../src${PYTHONPATH:+:${PYTHONPATH}}"
torchrun --nnodes 1 --nproc_per_node "${nproc_per_node}" -m llama_sft.cli dpo \
    --deepspeed "${deepspeed_config_file}" \
    --model_name_or_path "${pretrained_model}" \
    --tokenizer_name_or_path "${chinese_tokenizer_path}" \
    --dataset_dir "${dataset_dir}" \
    --validation_split_percentage 0.05 \
    --per_device_train_batch_size "${per_device_train_batch_size}" \
    --per_device_eval_batch_size "${per_device_eval_batch_size}" \
    --do_train \
    --do_eval \
    --seed $RANDOM \
    --fp16 \
    --max_steps "${training_steps}" \
    --lr_scheduler_type cosine \
    --learning_rate "${lr}" \
    --warmup_ratio 0.1 \
    --weight_decay 0 \
    --logging_strategy steps \
    --logging_steps 10 \
    --logging_first_step True \
    --save_strategy steps \
    --save_total_limit 3 \
    --evaluation_strategy steps \
    --eval_steps 50 \
    --save_steps 100 \
    --gradient_accumulation_steps "${gradient_accumulation_steps}" \
    --max_seq_length "${max_seq_length}" \
    --output_dir "${output_dir}" \
    --overwrite_output_dir \
    --ddp_timeout 30000 \
    --pref_loss "${pref_loss}" \
    --pref_beta "${pref_beta}" \
    --simpo_gamma "${simpo_gamma}" \
    --label_smoothing "${label_smoothing}" \
    --pref_ftx "${pref_ftx}" \
    --torch_dtype float16 \
    --ddp_find_unused_parameters False \
    --load_in_kbits "${load_in_kbits}" \
    --speedups "${speedups}" \
    "${optional[@]}"
