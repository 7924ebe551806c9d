"""The README's first command, at reduced length: nothing downloaded, accuracy clearly up."""

from __future__ import annotations

import json

import pytest

from llama_sft.demo import demo_records, run_demo

pytestmark = pytest.mark.slow


def test_held_out_instructions_are_new_phrasings_of_trained_words():
    train, held = demo_records()
    trained = {(r.instruction, r.output) for r in train}
    assert len(held) >= 15 and not trained & {(r.instruction, r.output) for r in held}
    assert {r.output for r in held} <= {r.output for r in train}


def test_demo_learns(tmp_path):
    result = run_demo(tmp_path, steps=200)
    assert result["before"] <= 0.1
    assert result["after"] >= result["before"] + 0.3
    losses = [loss for _, loss in result["losses"]]
    assert losses[-1] < losses[0] / 3
    lora_dir = tmp_path / "output" / "sft_lora_model"
    assert json.loads((lora_dir / "adapter_config.json").read_text())["r"] == 16
