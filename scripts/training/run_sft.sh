#!/usr/bin/env bash
# LoRA instruction fine-tuning, as the Chinese-LLaMA-Alpaca workflow documents it.
# Edit the parameters below (or set them in the environment). The defaults train on what
# `make demo` generated, so `bash scripts/training/run_sft.sh` runs right after it.
set -euo pipefail
cd "$(dirname "$0")"

########parameters########
lr=${lr:-1e-4}
lora_rank=${lora_rank:-64}
lora_alpha=${lora_alpha:-128}
lora_trainable=${lora_trainable:-"q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj"}
modules_to_save=${modules_to_save:-"embed_tokens,lm_head"}
lora_dropout=${lora_dropout:-0.05}

pretrained_model=${pretrained_model:-../../demo_output/base_model}
chinese_tokenizer_path=${chinese_tokenizer_path:-../../demo_output/tokenizer}
dataset_dir=${dataset_dir:-../../demo_output/data/train}
per_device_train_batch_size=${per_device_train_batch_size:-1}
per_device_eval_batch_size=${per_device_eval_batch_size:-1}
training_steps=${training_steps:-100}
gradient_accumulation_steps=${gradient_accumulation_steps:-8}
max_seq_length=${max_seq_length:-512}
output_dir=${output_dir:-../../outputs/sft}
peft_model=${peft_model:-}
validation_file=${validation_file:-../../demo_output/data/eval.json}
deepspeed_config_file=${deepspeed_config_file:-ds_zero2_no_offload.json}
nproc_per_node=${nproc_per_node:-1}
load_in_kbits=${load_in_kbits:-16}  # 4 or 8: QLoRA over quantised base weights (bitsandbytes)
full_finetuning=${full_finetuning:-False}  # True: train every weight; output in sft_full_model
speedups=${speedups:-auto}  # auto: every speed-up that fits; off: stock transformers/PEFT training
########parameters########

# Continue an existing LoRA when peft_model is set; otherwise start a new one.
peft_args=()
if [ -n "${peft_model}" ]; then
    peft_args=(--peft_path "${peft_model}")
fi

torchrun --nnodes 1 --nproc_per_node "${nproc_per_node}" run_clm_sft_with_peft.py \
    --deepspeed "${deepspeed_config_file}" \
    --model_name_or_path "${pretrained_model}" \
    --tokenizer_name_or_path "${chinese_tokenizer_path}" \
    --dataset_dir "${dataset_dir}" \
    --validation_split_percentage 0.001 \
    --per_device_train_batch_size "${per_device_train_batch_size}" \
    --per_device_eval_batch_size "${per_device_eval_batch_size}" \
    --do_train \
    --do_eval \
    --seed $RANDOM \
    --fp16 \
    --max_steps "${training_steps}" \
    --lr_scheduler_type cosine \
    --learning_rate "${lr}" \
    --warmup_ratio 0.03 \
    --weight_decay 0 \
    --logging_strategy steps \
    --logging_steps 10 \
    --save_strategy steps \
    --save_total_limit 3 \
    --evaluation_strategy steps \
    --eval_steps 100 \
    --save_steps 200 \
    --gradient_accumulation_steps "${gradient_accumulation_steps}" \
    --preprocessing_num_workers 8 \
    --max_seq_length "${max_seq_length}" \
    --output_dir "${output_dir}" \
    --overwrite_output_dir \
    --ddp_timeout 30000 \
    --logging_first_step True \
    --lora_rank "${lora_rank}" \
    --lora_alpha "${lora_alpha}" \
    --trainable "${lora_trainable}" \
    --modules_to_save "${modules_to_save}" \
    --lora_dropout "${lora_dropout}" \
    --torch_dtype float16 \
    --validation_file "${validation_file}" \
    --gradient_checkpointing \
    --ddp_find_unused_parameters False \
    --load_in_kbits "${load_in_kbits}" \
    --full_finetuning "${full_finetuning}" \
    --speedups "${speedups}" \
    "${peft_args[@]}"
