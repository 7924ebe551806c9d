"""llama-sft export, checked by llama.cpp itself (llama-cpp-python, which ``make test`` builds once).

The demo model with a LoRA trained by ``train`` (the demo's recipe, fewer steps) is exported and run by
llama.cpp: its greedy continuations, next-token choices and chat completions are compared with
transformers and ``llama-sft chat``; its tokenizer (and the real 32000/55296-piece ones when
``../shared`` is present) with SentencePiece.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import corpus, shared_path
from lora_helpers import peft_reference, write_base, write_lora
from memory_probe import measure

from llama_sft.cli import main as cli_main
from llama_sft.data.templates import Template, load_template, prompt_ids
from llama_sft.data.tokenizer import TextTokenizer
from llama_sft.tools.demo import build_demo, demo_records, demo_train_argv, make_model, make_tokenizer
from llama_sft.tools.export import export, export_files, modelfile, modelfile_path

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: `make test` builds and installs it once"
)

MAX_NEW = 16
# Text where segmenters part ways: spaces in runs and at the ends, newlines, tabs, digits,
# characters only byte fallback can spell, mixed scripts.
HARD_TEXTS = [
    "",
    " ",
    "   three leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnew\n\nlines\n",
    "emoji 😀🚀 and rare 龘靐 characters",
    "digits 1234567890 and 3.14159",
    "Hello world. 你好，世界。今天天气很好，我们去公园散步吧。",
    "中文和English混合 123。### Response:",
]


def llama(path: Path, **kwargs):
    """llama.cpp on the file, without weight repacking (llama.cpp's ``--no-repack``): on CPUs with AMX,
    llama.cpp's AMX copy of Q8_0 weights crashes this build (its own quantizer's Q8_0 files as well)."""
    from llama_cpp import llama as module

    defaults = module.llama_cpp.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    module.llama_cpp.llama_model_default_params = no_repack
    try:
        return llama_cpp.Llama(str(path), verbose=False, **kwargs)
    finally:
        module.llama_cpp.llama_model_default_params = defaults


def vocab_of(llm):
    return llama_cpp.llama_model_get_vocab(llm.model)


def attr(llm, token_id: int) -> int:
    return int(llama_cpp.llama_vocab_get_attr(vocab_of(llm), token_id))


def text_of(llm, token_id: int) -> str:
    return llama_cpp.llama_vocab_get_text(vocab_of(llm), token_id).decode("utf-8")


# ----------------------------------------------------------------------------------- the demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's base model and a LoRA trained on its data (modules_to_save embed_tokens,lm_head), the
    tokenizer and alpaca template saved with it; exported as f16, q8_0 and bf16."""
    from llama_sft.training.run import train

    root = tmp_path_factory.mktemp("demo")
    build_demo(root)
    lora = Path(train(demo_train_argv(root, 300)))
    files = {}
    for outtype in ("f16", "q8_0", "bf16"):
        files[outtype] = export(root / "base_model", [lora], root / f"demo-{outtype}.gguf", outtype)
    return root, lora, files


@pytest.fixture(scope="module")
def reference(demo):
    root, lora, _ = demo
    return peft_reference(root / "base_model", [lora])


def demo_sequences(tokenizer: TextTokenizer, template: Template) -> list[list[int]]:
    """Prompt + answer + EOS of each held-out, then training, record (teacher-forced positions)."""
    train, held = demo_records()
    return [
        prompt_ids(template, tokenizer, r.full_instruction) + tokenizer.encode(r.output) + [tokenizer.eos_id]
        for r in held + train
    ]


def top1_agreement(llm, model, sequences: list[list[int]], positions: int) -> tuple[int, int]:
    agree = total = 0
    for ids in sequences:
        llm.reset()
        llm.eval(ids)
        ours = llm.scores[: len(ids)].argmax(-1)
        with torch.no_grad():
            theirs = model(torch.tensor([ids])).logits[0].argmax(-1).numpy()
        take = min(len(ids), positions - total)
        agree += int((ours[:take] == theirs[:take]).sum())
        total += take
        if total == positions:
            break
    return agree, total


def test_f16_greedy_continuations_equal_transformers(demo, reference):
    root, lora, files = demo
    tokenizer = TextTokenizer.load(lora)
    template = load_template(lora)
    _, held = demo_records()
    assert len(held) >= 10
    llm = llama(files["f16"], n_ctx=512)
    try:
        answers = []
        for record in held:
            ids = prompt_ids(template, tokenizer, record.full_instruction)
            with torch.no_grad():
                output = reference.generate(
                    input_ids=torch.tensor([ids]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    max_new_tokens=MAX_NEW,
                    do_sample=False,
                    eos_token_id=tokenizer.eos_id,
                    pad_token_id=tokenizer.pad_id,
                )
            expected = output[0, len(ids) :].tolist()
            got = []
            for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                got.append(token)
                if token == tokenizer.eos_id or len(got) == MAX_NEW:
                    break
            assert got == expected, record.instruction
            answers.append(tokenizer.decode(got).strip())
    finally:
        llm.close()
    # The trained LoRA is in the file: it answers some held-out instructions correctly.
    correct = sum(answer == record.output for answer, record in zip(answers, held, strict=True))
    print(f"llama.cpp f16: {len(held)} greedy continuations equal; {correct} answers correct")
    assert correct >= 3


@pytest.mark.parametrize("outtype", ["q8_0", "bf16"])
def test_quantised_top1_agrees_with_transformers(demo, reference, outtype):
    root, lora, files = demo
    tokenizer = TextTokenizer.load(lora)
    llm = llama(files[outtype], n_ctx=512, logits_all=True)
    try:
        agree, total = top1_agreement(llm, reference, demo_sequences(tokenizer, load_template(lora)), 500)
    finally:
        llm.close()
    print(f"llama.cpp {outtype}: top-1 agrees at {agree}/{total} positions")
    assert total == 500
    assert agree / total >= 0.95
    sizes = {name: path.stat().st_size for name, path in files.items()}
    # q8_0: 34 bytes a block of 32 against f16's 64; the demo's 341-wide FFN matrices stay f16.
    assert sizes["q8_0"] < 0.7 * sizes["f16"] and sizes["bf16"] == pytest.approx(sizes["f16"], rel=0.01)


def test_quantised_perplexity_close_to_float_on_held_out_demo_text(demo, tmp_path):
    """export --check on the trained demo: llama.cpp's perplexity of each quantised file on the held-out
    conversations (prompt and answer, as the LoRA was trained on them) against the f16 file's."""
    root, lora, _ = demo
    template = load_template(lora)
    _, held = demo_records()
    documents = [{"text": template.render(r.full_instruction) + " " + r.output} for r in held]
    text = tmp_path / "held_out.jsonl"
    text.write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in documents) + "\n", encoding="utf-8")
    export_files(root / "base_model", [lora], tmp_path / "demo.gguf", "f16,q8_0,q4_k_m", check=text,
                 check_block_size=128, check_blocks=4)  # fmt: skip
    report = json.loads((tmp_path / "demo.check.json").read_text())
    rows = {row["outtype"]: row for row in report["files"]}
    print({t: (round(r["perplexity"], 3), round(r["top1_agreement"], 3)) for t, r in rows.items()})
    assert report["reference"] == "f16" and report["blocks"] == 4
    # Trained on answers only, the demo predicts prompts badly: the perplexity of whole conversations is
    # high, and what is checked is each quantised file's distance from the float one.
    assert math.isfinite(rows["f16"]["perplexity"]) and rows["f16"]["top1_agreement"] == 1.0
    for outtype in ("q8_0", "q4_k_m"):
        assert rows[outtype]["perplexity"] == pytest.approx(rows["f16"]["perplexity"], rel=0.1), outtype
        assert 0.9 <= rows[outtype]["top1_agreement"] <= 1.0, outtype


def test_chat_completion_with_embedded_template_equals_llama_sft_chat(demo, tmp_path):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    root, lora, files = demo
    tokenizer = TextTokenizer.load(lora)
    template = load_template(lora)
    _, held = demo_records()
    instructions = [r.full_instruction for r in held[:6]] + ["Hello, who are you?"]
    data = tmp_path / "questions.txt"
    data.write_text("\n".join(instructions) + "\n", encoding="utf-8")
    predictions = tmp_path / "predictions.json"
    cli_main(
        ["chat", "--base_model", str(root / "base_model"), "--lora_model", str(lora), "--data_file", str(data),
         "--predictions_file", str(predictions), "--do_sample", "false", "--repetition_penalty", "1.0",
         "--max_new_tokens", str(MAX_NEW)]
    )  # fmt: skip
    expected = [p["output"] for p in json.loads(predictions.read_text(encoding="utf-8"))]
    llm = llama(files["f16"], n_ctx=512)
    try:
        # llama.cpp found the template in the file and uses it (not one of its built-in formats).
        assert llm.metadata["tokenizer.chat_template"] == template.chat_template()
        assert llm.chat_format == "chat_template.default"
        formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], "</s>", "<s>")
        for instruction, answer in zip(instructions, expected, strict=True):
            messages = [{"role": "user", "content": instruction}]
            prompt = formatter(messages=messages).prompt
            assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == prompt_ids(
                template, tokenizer, instruction
            )
            llm.reset()
            reply = llm.create_chat_completion(
                messages=messages, temperature=0.0, repeat_penalty=1.0, max_tokens=MAX_NEW
            )
            assert reply["choices"][0]["message"]["content"].strip() == answer, instruction
    finally:
        llm.close()
    assert sum(answer == r.output for answer, r in zip(expected, held, strict=False)) >= 1


def test_llama2_chat_conversation_renders_to_prompt_ids_in_llama_cpp(demo):
    """A multi-turn llama2-chat conversation, system message included, rendered by the Jinja template
    (as a GGUF carries it) and tokenized by llama.cpp, is the ids chat and training use."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    root, lora, files = demo
    tokenizer = TextTokenizer.load(lora)
    template = load_template("llama2-chat")
    formatter = Jinja2ChatFormatter(template.chat_template(), "</s>", "<s>")
    history = [("What is 狗 in English?", "dog"), ("And 猫?", "cat")]
    llm = llama(files["f16"], vocab_only=True)
    try:
        for system in (None, "Answer in one word."):
            messages = [{"role": "system", "content": system}] if system else []
            for user, answer in history:
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            messages.append({"role": "user", "content": "Translate to Chinese: horse"})
            text = formatter(messages=messages).prompt
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt_ids(
                template, tokenizer, "Translate to Chinese: horse", history, system_prompt=system
            )
    finally:
        llm.close()


def test_demo_tokenizer_tokenizes_as_sentencepiece(demo):
    root, lora, files = demo
    tokenizer = TextTokenizer.load(lora)
    llm = llama(files["f16"], vocab_only=True)
    try:
        texts = corpus()[: len(corpus()) // 3] + HARD_TEXTS
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=False) == tokenizer.encode(text), text
            assert llm.tokenize(text.encode(), add_bos=True) == [tokenizer.bos_id] + tokenizer.encode(text)
        assert llm.n_vocab() == len(tokenizer) and llm.token_bos() == 1 and llm.token_eos() == 2
        pad = tokenizer.pad_id
        assert text_of(llm, pad) == "<pad>" and attr(llm, pad) & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        assert llm.metadata["tokenizer.ggml.padding_token_id"] == str(pad)
    finally:
        llm.close()


def test_modelfile_beside_the_gguf(demo):
    root, lora, files = demo
    text = modelfile_path(files["f16"]).read_text()
    assert text.startswith('FROM ./demo-f16.gguf\nTEMPLATE """')
    assert 'PARAMETER stop "</s>"' in text


def test_ollama_template_literal():
    template = Template(
        name="t",
        prompt="[INST] <<SYS>>\n{system_prompt}\n<</SYS>>\n\n{instruction} [/INST]",
        system_prompt="Be brief.",
        followup_prompt="[INST] {instruction} [/INST]",
    )
    assert modelfile("m.gguf", template, "</s>") == (
        'FROM ./m.gguf\nTEMPLATE """{{ $system := "Be brief." }}{{ if .System }}{{ $system = .System }}'
        '{{ end }}{{ $first := true }}{{ range .Messages }}{{ if eq .Role "user" }}{{ if $first }}'
        "[INST] <<SYS>>\n{{ $system }}\n<</SYS>>\n\n{{ .Content }} [/INST]{{ else }}<s>[INST] {{ .Content }} "
        '[/INST]{{ end }}{{ $first = false }}{{ else if eq .Role "assistant" }} {{ .Content }}</s>'
        '{{ end }}{{ end }}"""\nPARAMETER stop "</s>"\nPARAMETER stop "[INST]"\n'
    )
    braces = Template(name="b", prompt="{{literal}} {instruction}\n### Response: ")
    text = modelfile("m.gguf", braces, "</s>")
    assert '{{ "{{" }}literal}} {{ .Content }}' in text and "PARAMETER stop" in text
    # The prompt's trailing space stays: no action trims the text before it.
    assert "\n### Response: {{ else }}" in text


# ----------------------------------------------------------------------------------- real vocabularies


def tiny_model_with(tokenizer_folder: Path, folder: Path, rows: int) -> Path:
    make_model(folder, rows, hidden=16, layers=1, heads=2, intermediate=32)
    TextTokenizer.load(tokenizer_folder).save(folder)
    return folder


def test_alpaca_zh_demo_tokenized_as_sentencepiece_by_llama_cpp_55296(tmp_path):
    pieces = shared_path("tokenizers/chinese-llama-2")
    records = json.loads(shared_path("data/alpaca_zh_demo.json").read_text(encoding="utf-8"))
    assert len(records) == 1000
    tokenizer = TextTokenizer.load(pieces)
    assert tokenizer.base_size == 55296
    model = tiny_model_with(pieces, tmp_path / "model", 55296)
    out = export(model, [], tmp_path / "zh.gguf", "f16")
    template = load_template("alpaca")
    llm = llama(out, vocab_only=True)
    try:
        assert llm.n_vocab() == 55296
        for number, record in enumerate(records):
            instruction = record["instruction"] + ("\n" + record["input"] if record.get("input") else "")
            for text in (instruction, record["output"], template.render(instruction)):
                assert llm.tokenize(text.encode(), add_bos=False) == tokenizer.encode(text), number
        sp = tokenizer.sp
        for token_id in (0, 1, 2, 3, 258, 259, 1000, 31999, 32000, 40000, 55295):
            assert text_of(llm, token_id) == sp.id_to_piece(token_id)
            assert llama_cpp.llama_vocab_get_score(vocab_of(llm), token_id) == pytest.approx(
                sp.get_score(token_id)
            )
        assert attr(llm, 0) & llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        assert (
            attr(llm, 1) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
            and attr(llm, 2) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
        )
        assert (
            attr(llm, 3) & llama_cpp.LLAMA_TOKEN_ATTR_BYTE
            and attr(llm, 258) & llama_cpp.LLAMA_TOKEN_ATTR_BYTE
        )
        assert attr(llm, 40000) & llama_cpp.LLAMA_TOKEN_ATTR_NORMAL
        # Its <pad> is the piece Chinese-LLaMA-2 added at 32000.
        assert text_of(llm, tokenizer.pad_id) == "<pad>"
        assert llm.metadata["tokenizer.ggml.padding_token_id"] == str(tokenizer.pad_id)
        assert llm.metadata["tokenizer.ggml.add_bos_token"] == "true"
    finally:
        llm.close()


def test_llama_32000_with_an_added_pad_row(tmp_path):
    """LLaMA's tokenizer plus a <pad> row, as Chinese-Alpaca's 49954 = 49953 pieces + <pad>."""
    pieces = tmp_path / "tokenizer"
    pieces.mkdir()
    shutil.copyfile(shared_path("tokenizers/llama/tokenizer.model"), pieces / "tokenizer.model")
    (pieces / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    tokenizer = TextTokenizer.load(pieces)
    assert len(tokenizer) == 32001 and tokenizer.pad_id == 32000
    model = tiny_model_with(pieces, tmp_path / "model", 32001)
    out = export(model, [], tmp_path / "llama.gguf", "q8_0")
    llm = llama(out, vocab_only=True)
    try:
        assert llm.n_vocab() == 32001
        assert text_of(llm, 32000) == "<pad>" and attr(llm, 32000) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
        assert llm.metadata["tokenizer.ggml.padding_token_id"] == "32000"
        for text in [*HARD_TEXTS, *corpus()[:40], "a <pad> is not parsed from text"]:
            assert llm.tokenize(text.encode(), add_bos=False) == tokenizer.encode(text), text
    finally:
        llm.close()


# ----------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize(
    ("kv_heads", "rope", "fmt"),
    [
        (2, None, "bin"),
        (4, {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}, "safetensors"),
        (1, {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64}, "safetensors"),
    ],
    ids=["gqa-bin-shards", "linear-rope", "mqa-yarn-rope"],
)  # fmt: skip
def test_logits_equal_transformers_for_gqa_and_rope_scaling(
    tmp_path, tokenizer, tokenizer_dir, kv_heads, rope, fmt
):
    """f32 export of a sharded base + a LoRA: llama.cpp's logits are transformers', so the q/k row
    order, the grouped key/value heads and the RoPE settings all reached llama.cpp."""
    base = tmp_path / "base"
    write_base(base, vocab=len(tokenizer), hidden=64, heads=4, kv_heads=kv_heads, shards=2, fmt=fmt)
    if rope is not None:
        config = json.loads((base / "config.json").read_text())
        config["rope_parameters"] = rope
        (base / "config.json").write_text(json.dumps(config))
    lora = write_lora(base, tmp_path / "lora")
    TextTokenizer.load(tokenizer_dir).save(lora)
    out = export(base, [lora], tmp_path / "m.gguf", "f32")
    ids = [tokenizer.bos_id] + tokenizer.encode(corpus()[0])[:150]
    reference = peft_reference(base, [lora])
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    llm = llama(out, n_ctx=256, logits_all=True)
    try:
        llm.eval(ids)
        got = llm.scores[: len(ids)]
        meta = llm.metadata
    finally:
        llm.close()
    assert abs(got - expected).max() < 2e-3 * abs(expected).max(), abs(got - expected).max()
    assert meta["llama.attention.head_count"] == "4" and meta["llama.attention.head_count_kv"] == str(
        kv_heads
    )
    assert meta["llama.context_length"] == "256" and meta["llama.embedding_length"] == "64"
    assert float(meta["llama.attention.layer_norm_rms_epsilon"]) == pytest.approx(1e-6)
    if rope is not None:
        assert float(meta["llama.rope.freq_base"]) == rope["rope_theta"]
        assert meta["llama.rope.scaling.type"] == rope["rope_type"]
        assert float(meta["llama.rope.scaling.factor"]) == rope["factor"]


# ----------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_export_peak_memory_is_about_one_shard(tmp_path, tokenizer_dir, outtype):
    base = tmp_path / "base"
    shards = 6
    # hidden 768 x 8 layers, float32: ~180 MB in all, ~30 MB a shard.
    state = write_base(
        base, vocab=len(TextTokenizer.load(tokenizer_dir)), hidden=768, layers=8, heads=12, shards=shards
    )
    total = sum(v.numel() * v.element_size() for v in state.values())
    del state
    lora = write_lora(base, tmp_path / "lora", targets=["q_proj", "v_proj", "down_proj"], r=8)
    TextTokenizer.load(tokenizer_dir).save(lora)
    largest = max(p.stat().st_size for p in base.glob("model-*.safetensors"))
    out = tmp_path / "m.gguf"
    numbers = measure(
        "from llama_sft.tools.export import export",
        "export(argv[0], [argv[1]], argv[2], argv[3])",
        base,
        lora,
        out,
        outtype,
    )
    growth = numbers["growth"]
    print(
        f"{outtype}: model {total / 2**20:.0f} MB in {shards} shards (largest {largest / 2**20:.0f} MB); "
        f"export peak RSS growth {growth / 2**20:.0f} MB, {numbers['seconds']:.1f} s, "
        f"file {out.stat().st_size / 2**20:.0f} MB"
    )
    assert growth < 2 * largest, (growth, largest)
    assert growth < total / 2
    llm = llama(out, vocab_only=True)
    llm.close()


# ----------------------------------------------------------------------------------- bad input

BAD = Path(__file__).parent / "bad_inputs" / "export"


def run_export(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli_main(["export", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err[-2000:]
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ")
    return lines[-1]


@pytest.fixture(scope="module")
def small(tmp_path_factory, tokenizer_dir):
    """A base (tokenizer and template in its folder) and a LoRA over it."""
    root = tmp_path_factory.mktemp("small")
    write_base(root / "base", vocab=len(TextTokenizer.load(tokenizer_dir)))
    TextTokenizer.load(tokenizer_dir).save(root / "base")
    write_lora(root / "base", root / "lora", targets=["q_proj", "v_proj"])
    return root


def use_config(name: str):
    def setup(root: Path, argv: dict) -> None:
        config = json.loads((root / "base" / "config.json").read_text())
        config.update(json.loads((BAD / name).read_text()))
        (root / "base" / "config.json").write_text(json.dumps(config))

    setup.file = name
    return setup


def tokenizer_json_only(root: Path, argv: dict) -> None:
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (root / "base" / name).unlink()
    shutil.copyfile(BAD / "tokenizer.json", root / "base" / "tokenizer.json")
    shutil.copyfile(BAD / "tokenizer_config.json", root / "base" / "tokenizer_config.json")


tokenizer_json_only.file = "tokenizer.json"


def unigram_tokenizer(root: Path, argv: dict) -> None:
    # A base whose rows match the unigram model's pieces, so only the kind of model is wrong.
    shutil.copyfile(BAD / "unigram.model", root / "base" / "tokenizer.model")
    write_base(root / "base", vocab=len(TextTokenizer.load(root / "base")))
    argv["lora_model"] = ""


unigram_tokenizer.file = "unigram.model"


def lora_with_larger_vocabulary(root: Path, argv: dict) -> None:
    # Embedding rows for 8 more tokens but no tokenizer that has them.
    write_lora(root / "base", root / "wide", vocab=len(TextTokenizer.load(root / "base")) + 8)
    argv["lora_model"] = str(root / "wide")


def lora_tokenizer_too_large(root: Path, argv: dict) -> None:
    make_tokenizer(root / "lora", [*corpus(), "额外的词 extra words"], vocab_size=700)


def lora_of_other_base(root: Path, argv: dict) -> None:
    write_base(root / "other", hidden=48)
    write_lora(root / "other", root / "other_lora", targets=["q_proj"])
    argv["lora_model"] = str(root / "other_lora")


def existing_output(root: Path, argv: dict) -> None:
    (root / "out" / "m.gguf").write_bytes(b"an older export")


def little_disk(root: Path, argv: dict) -> None:
    argv["_disk"] = 10 * 2**20


def disk_fills_up(root: Path, argv: dict) -> None:
    argv["_enospc"] = True


def flags(**values):
    def setup(root: Path, argv: dict) -> None:
        argv.update(values)

    return setup


# (name, setup, fragments of the one-line message)
CASES = [
    (
        "not LLaMA",
        use_config("qwen2_config.json"),
        ["config.json: model_type 'qwen2'", "convert_hf_to_gguf.py"],
    ),
    ("bias vectors", use_config("attention_bias_config.json"), ["attention_bias is true"]),
    ("dynamic RoPE", use_config("rope_dynamic_config.json"), ["RoPE scaling 'dynamic'", "linear or yarn"]),
    (
        "tokenizer.json only",
        tokenizer_json_only,
        ["no tokenizer.model", "SentencePiece vocabularies", "49954"],
    ),
    ("unigram SentencePiece", unigram_tokenizer, ["tokenizer.model: a SentencePiece UNIGRAM model", "BPE"]),
    ("LoRA vocabulary without its tokenizer", lora_with_larger_vocabulary, ["tokens but", "rows"]),
    ("LoRA tokenizer larger than the model", lora_tokenizer_too_large, ["tokenizer has", "embedding rows"]),
    ("LoRA of another base", lora_of_other_base, ["another base model"]),
    (
        "template's end-of-turn token missing",
        flags(prompt_template="chatml"),
        ["'<|im_end|>', which the tokenizer does not have"],
    ),
    ("unknown outtype", flags(outtype="q4_k"), ["--outtype 'q4_k': choose one of f32, f16, bf16, q8_0"]),
    ("existing output", existing_output, ["m.gguf: already exists; pass --overwrite"]),
    (
        "output folder missing",
        flags(output_file="/nonexistent/dir/m.gguf"),
        ["/nonexistent/dir does not exist"],
    ),
    ("not a .gguf name", flags(output_file="OUT/m.bin"), ["m.bin: name the file NAME.gguf"]),
    ("too little disk", little_disk, ["m.gguf: needs about", "GiB free; free some space"]),
    ("disk fills up", disk_fills_up, ["m.gguf: the disk filled up while writing"]),
]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("name", "setup", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(small, tmp_path, capsys, monkeypatch, name, setup, fragments):
    import llama_sft.tools.export as export_module

    root = tmp_path
    shutil.copytree(small / "base", root / "base")
    shutil.copytree(small / "lora", root / "lora")
    (root / "out").mkdir()
    argv = {"lora_model": str(root / "lora"), "output_file": str(root / "out" / "m.gguf")}
    setup(root, argv)
    argv["output_file"] = argv["output_file"].replace("OUT", str(root / "out"))
    if "_disk" in argv:
        free = argv.pop("_disk")
        usage = shutil.disk_usage(root)
        monkeypatch.setattr(export_module.shutil, "disk_usage", lambda path: usage._replace(free=free))
    if argv.pop("_enospc", False):
        real = export_module.convert
        calls = []

        def full_disk(*args):
            calls.append(1)
            if len(calls) > 3:
                raise OSError(28, "No space left on device")
            return real(*args)

        monkeypatch.setattr(export_module, "convert", full_disk)
    before = snapshot(root / "out")
    line = run_export(["--base_model", str(root / "base"), *[f"--{k}={v}" for k, v in argv.items()]], capsys)
    for fragment in fragments:
        assert fragment in line, line
    assert snapshot(root / "out") == before  # nothing written, no temporary file left


def test_bad_input_corpus_is_used():
    used = {getattr(setup, "file", None) for _, setup, _ in CASES} | {"tokenizer_config.json"}
    assert {p.name for p in BAD.iterdir() if p.name != "README.md"} == used - {None}


def test_overwrite_replaces_and_leaves_no_temporary_files(small, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    argv = ["export", "--base_model", str(small / "base"), "--lora_model", str(small / "lora")]
    cli_main([*argv, "--output_file", str(out), "--outtype", "q8_0", "--overwrite"])
    assert "ollama create NAME -f" in capsys.readouterr().out
    assert out.read_bytes()[:4] == b"GGUF" and modelfile_path(out).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "m.gguf"]
    # A merged folder, no LoRA; the template defaults to alpaca when none is saved.
    cli_main(["export", "--base_model", str(small / "base"), "--output_file", str(out), "--overwrite"])
    llm = llama(out, vocab_only=True)
    try:
        assert llm.metadata["tokenizer.chat_template"] == load_template("alpaca").chat_template()
    finally:
        llm.close()
