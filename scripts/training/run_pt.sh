#!/usr/bin/env bash
# LoRA continued pre-training on plain text, as the Chinese-LLaMA-Alpaca workflow documents it: the
# LoRA and the embedding rows (modules_to_save) learn an extended vocabulary before instruction tuning.
# Edit the parameters below (or set them in the environment). The defaults train on what
# `make demo` generated, so `bash scripts/training/run_pt.sh` runs right after it.
set -euo pipefail
cd "$(dirname "$0")"

########parameters########
lr=${lr:-2e-4}
lora_rank=${lora_rank:-64}
lora_alpha=${lora_alpha:-128}
lora_trainable=${lora_trainable:-"q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj"}
modules_to_save=${modules_to_save:-"embed_tokens,lm_head"}
lora_dropout=${lora_dropout:-0.05}

pretrained_model=${pretrained_model:-../../demo_output/base_model}
chinese_tokenizer_path=${chinese_tokenizer_path:-../../demo_output/tokenizer}
dataset_dir=${dataset_dir:-../../demo_output/data/pt}
data_cache=${data_cache:-../../outputs/pt_data_cache}
per_device_train_batch_size=${per_device_train_batch_size:-1}
gradient_accumulation_steps=${gradient_accumulation_steps:-8}
block_size=${block_size:-512}
output_dir=${output_dir:-../../outputs/pt}

deepspeed_config_file=${deepspeed_config_file:-ds_zero2_no_offload.json}
nproc_per_node=${nproc_per_node:-1}
num_train_epochs=${num_train_epochs:-1}
load_in_kbits=${load_in_kbits:-16}  # 4 or 8: QLoRA over quantised base weights (bitsandbytes)
speedups=${speedups:-auto}  # auto: every speed-up that fits; off: stock transformers/PEFT training
########parameters########

torchrun --nnodes 1 --nproc_per_node "${nproc_per_node}" run_clm_pt_with_peft.py \
    --deepspeed "${deepspeed_config_file}" \
    --model_name_or_path "${pretrained_model}" \
    --tokenizer_name_or_path "${chinese_tokenizer_path}" \
    --dataset_dir "${dataset_dir}" \
    --data_cache_dir "${data_cache}" \
    --validation_split_percentage 0.001 \
    --per_device_train_batch_size "${per_device_train_batch_size}" \
    --do_train \
    --seed $RANDOM \
    --fp16 \
    --num_train_epochs "${num_train_epochs}" \
    --lr_scheduler_type cosine \
    --learning_rate "${lr}" \
    --warmup_ratio 0.05 \
    --weight_decay 0.01 \
    --logging_strategy steps \
    --logging_steps 10 \
    --save_strategy steps \
    --save_total_limit 3 \
    --save_steps 200 \
    --gradient_accumulation_steps "${gradient_accumulation_steps}" \
    --preprocessing_num_workers 8 \
    --block_size "${block_size}" \
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
    --load_in_kbits "${load_in_kbits}" \
    --save_safetensors False \
    --gradient_checkpointing \
    --ddp_find_unused_parameters False \
    --speedups "${speedups}"
