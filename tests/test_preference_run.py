"""`llama-sft dpo` end to end: from an SFT LoRA to dpo_lora_model, which merge and chat read; the first
step's loss and rewards, learning a preference, bad pairs, and SIGKILL then resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_quiet, flags_to_argv, write_json
from lora_helpers import write_lora
from safetensors.torch import load_file
from test_bad_records_training import assert_one_line_error, run_cli
from test_reliability import run_with

from llama_sft.data.templates import load_template
from llama_sft.data.tokenizer import TextTokenizer
from llama_sft.training.checkpoints import checkpoints
from llama_sft.training.run import train

WORDS = ["red", "cat", "dog", "ten", "water", "fire", "horse", "world", "park", "blue", "green", "tree"]


def pairs(words: list[str], phrasing: str) -> list[dict]:
    # The chosen answer says "Yes", the rejected one "No", each followed by the word: a style that
    # holds across prompts, so it can be learnt from some and shown on others.
    return [
        {"instruction": phrasing.format(w=word), "chosen": f"Yes {word}", "rejected": f"No {word}"}
        for word in words
    ]


@pytest.fixture(scope="module")
def start(model_dir, tokenizer_dir, tmp_path_factory):
    """An SFT LoRA (random, self-describing as sft_lora_model is) and the pair files."""
    root = tmp_path_factory.mktemp("dpo")
    # lm_head trained in full (as Chinese-Alpaca's LoRAs do): a random model of this size learns an
    # answer's first tokens in a dozen steps only through it.
    sft = write_lora(
        model_dir,
        root / "sft_lora_model",
        targets=["q_proj", "v_proj", "o_proj"],
        modules_to_save=["lm_head"],
    )
    TextTokenizer.load(tokenizer_dir).save(sft)
    load_template("alpaca").save(sft)
    train = pairs(WORDS[:9], "Say a word about {w}.") + pairs(WORDS[:9], "Tell me about {w}, please.")
    # One bad pair: its two answers are the same.
    train.append({"instruction": "Repeat red.", "chosen": "red", "rejected": "red"})
    write_json(root / "data" / "train" / "pairs.json", train)
    write_json(root / "data" / "eval.json", pairs(WORDS[9:], "Say a word about {w}."))
    return root


def dpo_argv(model_dir, tokenizer_dir, start, out, **overrides) -> list[str]:
    flags = {
        "model_name_or_path": model_dir,
        "tokenizer_name_or_path": tokenizer_dir,
        "peft_path": start / "sft_lora_model",
        "dataset_dir": start / "data" / "train",
        "validation_file": start / "data" / "eval.json",
        "data_cache_dir": start / "cache",
        "output_dir": out,
        "do_train": True,
        "do_eval": True,
        "eval_strategy": "steps",
        "eval_steps": 12,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "max_steps": 12,
        "learning_rate": 2e-2,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_steps": 6,
        "max_seq_length": 96,
        "seed": 5,
        "pref_beta": 0.5,
        # With an SFT term on the chosen answers, greedy decoding picks up the chosen style too.
        "pref_ftx": 1.0,
        "on_bad_records": "skip",
        "report_to": "none",
        "disable_tqdm": "True",
    }
    flags.update(overrides)
    return flags_to_argv(flags)


def yes_share(root, tokenizer_dir, base, lora, capsys) -> float:
    """Share of the prompts whose greedy answer (llama-sft chat) starts as the chosen "Yes" does (its first
    piece, "Y"), where the rejected answers start "No"."""
    from llama_sft.cli import main as cli_main

    questions = root / "questions.txt"
    questions.write_text("\n\n".join(p["instruction"] for p in pairs(WORDS, "Say a word about {w}.")) + "\n")
    out = root / f"predictions-{lora.parent.name}.json"
    cli_main(
        [
            "chat", "--base_model", str(base), "--lora_model", str(lora), "--data_file", str(questions),
            "--predictions_file", str(out), "--do_sample", "false", "--max_new_tokens", "2",
        ]
    )  # fmt: skip
    capsys.readouterr()
    answers = [p["output"] for p in json.loads(out.read_text())]
    return sum(answer.strip().startswith("Y") for answer in answers) / len(answers)


def test_dpo_learns_the_preference_and_its_lora_merges_and_chats(
    model_dir, tokenizer_dir, start, tmp_path, capsys
):
    out = tmp_path / "out"
    # One evaluation, at the end; no checkpoint (the resume test has them).
    argv = dpo_argv(model_dir, tokenizer_dir, start, out, eval_strategy="no", save_strategy="no")
    code, err = run_cli("dpo", argv, capsys)
    assert code == 0, err[-3000:]
    lora = out / "dpo_lora_model"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.model", "template.json"):
        assert (lora / name).is_file(), name
    described = json.loads((lora / "training_args.json").read_text())
    assert described["task"] == "preference training"
    assert described["preference"] == {
        "loss": "sigmoid", "beta": 0.5, "simpo_gamma": 0.5, "label_smoothing": 0.0, "ftx": 1.0
    }  # fmt: skip
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["train"]["pairs"] == 18 and stats["bad_records"]["train"]["by_reason"] == {"same answers": 1}

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    first = history[0]
    # Before any update the policy is the reference: DPO's loss is ln 2 and every reward 0 (here plus
    # the SFT term, the chosen answers' mean token cross-entropy).
    assert first["step"] == 1 and first["nll_loss"] > 0
    assert first["loss"] == pytest.approx(math.log(2) + first["nll_loss"], abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert first[name] == pytest.approx(0.0, abs=1e-6), name
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    # On the held-out pairs (prompts of words never trained).
    evaluated = json.loads((out / "eval_results.json").read_text())
    assert evaluated["eval_rewards/accuracies"] >= 0.9 and evaluated["eval_rewards/margins"] > 0
    last = [h for h in history if "loss" in h][-1]
    assert last["loss"] - last["nll_loss"] < 0.5 and last["nll_loss"] < first["nll_loss"] / 2

    # The DPO LoRA continues the SFT one: merged into the base alone, it serves chat and moves its
    # greedy answers toward the chosen style on prompts it never saw.
    from llama_sft.cli import main as cli_main

    cli_main(
        [
            "merge",
            "--base_model",
            str(model_dir),
            "--lora_model",
            str(lora),
            "--output_dir",
            str(tmp_path / "m"),
        ]
    )
    assert (tmp_path / "m" / "template.json").is_file()
    before = yes_share(tmp_path, tokenizer_dir, model_dir, start / "sft_lora_model", capsys)
    after = yes_share(tmp_path, tokenizer_dir, model_dir, lora, capsys)
    assert after >= 0.75 and after > before


def test_bad_pairs_stop_the_run_before_anything_is_written(model_dir, tokenizer_dir, start, tmp_path, capsys):
    out = tmp_path / "out"
    pairs_file = start / "data" / "train" / "pairs.json"
    code, err = run_cli("dpo", dpo_argv(model_dir, tokenizer_dir, start, out, on_bad_records="stop"), capsys)
    assert code == 2 and not out.exists()
    assert_one_line_error(
        err, f"error: {pairs_file}, record 18", "'chosen' and 'rejected' encode to the same"
    )
    argv = dpo_argv(model_dir, tokenizer_dir, start, out, max_bad_fraction=0.01)
    code, err = run_cli("dpo", argv, capsys)
    assert code == 2 and not out.exists()
    assert_one_line_error(err, "--max_bad_fraction")
    code, err = run_cli("train", [*dpo_argv(model_dir, tokenizer_dir, start, out)], capsys)
    assert code == 2 and not out.exists()
    assert_one_line_error(err, "--pref_beta is for preference training (llama-sft dpo")


def test_sigkill_then_resume_gives_the_same_adapter(model_dir, tokenizer_dir, start, tmp_path):
    def argv(out):
        return dpo_argv(
            model_dir, tokenizer_dir, start, out, max_steps=6, save_steps=3, do_eval=False, eval_strategy="no"
        )

    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    # Only the run that is killed needs a process of its own.
    train(argv(reference), task="dpo")
    result = run_with(argv(crashed), step=4, what=9, task="dpo")
    assert result.returncode == -9
    assert_quiet(result, "llama-sft dpo")
    assert [c.name for c in checkpoints(crashed)] == ["checkpoint-3"]
    assert not (crashed / "dpo_lora_model").exists()
    # The same command again resumes from checkpoint-3, its reference scored again from the start model.
    train(argv(crashed), task="dpo")
    resumed = load_file(crashed / "dpo_lora_model" / "adapter_model.safetensors")
    expected = load_file(reference / "dpo_lora_model" / "adapter_model.safetensors")
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key
