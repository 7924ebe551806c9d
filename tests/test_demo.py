"""The README's first command, at reduced length: nothing downloaded, accuracy clearly up."""

from __future__ import annotations

import json

import pytest

from llama_sft.cli import main
from llama_sft.tools.demo import demo_records, run_demo

pytestmark = pytest.mark.slow


def test_held_out_instructions_are_new_phrasings_of_trained_words():
    train, held = demo_records()
    trained = {(r.instruction, r.output) for r in train}
    assert len(held) >= 15 and not trained & {(r.instruction, r.output) for r in held}
    assert {r.output for r in held} <= {r.output for r in train}


def test_demo_learns_and_chat_gives_the_same_answers(tmp_path):
    result = run_demo(tmp_path, steps=300)
    assert result["before"] <= 0.1
    assert result["after"] >= result["before"] + 0.3
    losses = [loss for _, loss in result["losses"]]
    assert losses[-1] < losses[0] / 3
    lora_dir = tmp_path / "output" / "sft_lora_model"
    assert json.loads((lora_dir / "adapter_config.json").read_text())["r"] == 16

    # The trained adapter through `llama-sft chat` (template read from the LoRA, greedy decoding)
    # answers the held-out instructions as well as the demo's own greedy evaluation did.
    _, held = demo_records()
    data = tmp_path / "held_out.json"
    data.write_text(
        json.dumps([{"instruction": r.instruction, "input": r.input} for r in held], ensure_ascii=False)
    )
    predictions = tmp_path / "predictions.json"
    main(
        ["chat", "--base_model", str(tmp_path / "base_model"), "--lora_model", str(lora_dir), "--data_file", str(data),
         "--predictions_file", str(predictions), "--do_sample", "false", "--repetition_penalty", "1.0",
         "--max_new_tokens", "16"]
    )  # fmt: skip
    answers = [p["output"] for p in json.loads(predictions.read_text(encoding="utf-8"))]
    correct = sum(answer == r.output for answer, r in zip(answers, held, strict=True))
    assert correct >= 1
    assert correct / len(held) == pytest.approx(result["after"])

    # `llama-sft eval --task generate` on the demo's held-out records: the LoRA scores what the demo
    # measured, far above its base under the same template.
    scores = {}
    for name, model in (("base", []), ("lora", ["--lora_model", str(lora_dir)])):
        out = tmp_path / f"eval-{name}"
        main(
            ["eval", "--task", "generate", "--base_model", str(tmp_path / "base_model"), *model,
             "--tokenizer_path", str(tmp_path / "tokenizer"), "--prompt_template", "alpaca",
             "--validation_file", str(tmp_path / "data" / "eval.json"), "--max_new_tokens", "16",
             "--output_dir", str(out)]
        )  # fmt: skip
        scores[name] = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert scores["lora"]["exact_match"] == pytest.approx(100 * result["after"], abs=0.01)
    assert scores["lora"]["exact_match"] >= scores["base"]["exact_match"] + 30
    assert scores["lora"]["rouge-1"] > scores["base"]["rouge-1"]
