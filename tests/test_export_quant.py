"""llama-sft export's llama.cpp types (k-quants and legacy 4/5-bit, made by llama.cpp's own quantizer),
its --check (perplexity and top-1 agreement in llama.cpp), the Ollama Modelfile of every built-in
template, and what LoRA servers (vLLM) are told and given.

A tiny random LLaMA (hidden 64, feed-forward 256) has both kinds of matrix: rows of 256 values, which
take a k-quant, and rows of 64, which llama.cpp gives another type.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys

import gguf
import pytest
import torch
from conftest import corpus, shared_path
from lora_helpers import write_base, write_lora

from llama_sft.cli import main as cli_main
from llama_sft.data.templates import load_template, prompt_ids, render_text
from llama_sft.data.tokenizer import TextTokenizer
from llama_sft.tools.demo import make_model, make_tokenizer
from llama_sft.tools.export import (
    export_files,
    load_gguf,
    modelfile_path,
    read_check_blocks,
    stop_strings,
)
from llama_sft.tools.merge import merge
from llama_sft.tools.weights import lora_server_notice, read_adapter, read_base_model

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: `make test` builds and installs it once"
)

CHAT_SYMBOLS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QUANTS = ["q4_k_m", "q5_k_m", "q6_k", "q4_0", "q5_0"]
T = gguf.GGMLQuantizationType
# The type llama.cpp gave each kind of matrix: ffn_down has rows of 256 (a k-quant fits), every other
# matrix rows of 64, where llama.cpp falls back (k-quants to q5_0/q5_1/q8_0) as its quantizer chooses.
# q4_k_m/q5_k_m put some layers' ffn_down in q6_k; the output matrix goes to q6_k, which falls back to q8_0.
EXPECTED_TYPES = {
    "q4_k_m": {"ffn_down": {T.Q4_K, T.Q6_K}, "attn_q": {T.Q5_0}, "output": {T.Q8_0}},
    "q5_k_m": {"ffn_down": {T.Q5_K, T.Q6_K}, "attn_q": {T.Q5_1}, "output": {T.Q8_0}},
    "q6_k": {"ffn_down": {T.Q6_K}, "attn_q": {T.Q8_0}, "output": {T.Q8_0}},
    "q4_0": {"ffn_down": {T.Q4_0}, "attn_q": {T.Q4_0}, "output": {T.Q8_0}},
    "q5_0": {"ffn_down": {T.Q5_0}, "attn_q": {T.Q5_0}, "output": {T.Q8_0}},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tokenizer with chatml's and Llama 3's turn tokens as pieces, and a random model over it."""
    root = tmp_path_factory.mktemp("quant")
    tokenizer = make_tokenizer(root / "model", corpus(), vocab_size=500, symbols=CHAT_SYMBOLS)
    make_model(root / "model", len(tokenizer), hidden=64, layers=2, heads=4, intermediate=256)
    documents = [json.dumps({"text": text}, ensure_ascii=False) for text in corpus()[:60]]
    (root / "held_out.jsonl").write_text("\n".join(documents) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def quantized(tiny):
    """f32 plus every llama.cpp type from one export, checked on the held-out text."""
    out = tiny / "out"
    out.mkdir()
    files = export_files(
        tiny / "model",
        [],
        out / "m.gguf",
        ",".join(["f32", *QUANTS]),
        check=tiny / "held_out.jsonl",
        check_block_size=128,
        check_blocks=2,
    )
    return out, files


def test_list_writes_every_type_with_its_modelfile_and_no_temporary_file(quantized):
    out, files = quantized
    assert list(files) == ["f32", *QUANTS]
    names = sorted(p.name for p in out.iterdir())
    expected = [f"m.{t}.{ext}" for t in ["f32", *QUANTS] for ext in ("Modelfile", "gguf")]
    assert names == sorted([*expected, "m.check.json"])
    for outtype, path in files.items():
        assert modelfile_path(path).read_text().startswith(f"FROM ./m.{outtype}.gguf\n")
    sizes = {t: p.stat().st_size for t, p in files.items()}
    assert sizes["q4_0"] < sizes["q5_0"] < sizes["q6_k"] < sizes["f32"] / 3


def test_llama_cpp_chose_each_tensors_type(quantized):
    _, files = quantized
    for outtype, wanted in EXPECTED_TYPES.items():
        reader = gguf.GGUFReader(files[outtype])
        types = {t.name: T(t.tensor_type) for t in reader.tensors}
        print(
            outtype, {name: kind.name for name, kind in types.items() if name.startswith(("blk.0", "output"))}
        )
        for kind, allowed in wanted.items():
            found = {
                v for name, v in types.items() if name.split(".")[-2] == kind or name == f"{kind}.weight"
            }
            assert found and found <= allowed, (outtype, kind, found)
        assert types["blk.0.attn_norm.weight"] == T.F32
        file_type = reader.fields["general.file_type"]
        assert int(file_type.parts[file_type.data[0]][0]) == getattr(
            llama_cpp, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}"
        )


def test_quantized_files_load_and_generate_in_llama_cpp(quantized, tiny):
    _, files = quantized
    tokenizer = TextTokenizer.load(tiny / "model")
    ids = [tokenizer.bos_id, *tokenizer.encode("Give the English word for 红色.")]
    for outtype in QUANTS:
        llm = load_gguf(files[outtype], n_ctx=64)
        try:
            tokens = []
            for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
                tokens.append(token)
                if len(tokens) == 4:
                    break
            assert len(tokens) == 4 and all(0 <= t < len(tokenizer) for t in tokens)
        finally:
            llm.close()


def test_check_reports_perplexity_and_agreement_equal_to_transformers_for_f32(quantized, tiny):
    from transformers import AutoModelForCausalLM

    out, _ = quantized
    report = json.loads((out / "m.check.json").read_text())
    assert report["reference"] == "f32" and report["blocks"] == 2 and report["block_size"] == 128
    rows = {row["outtype"]: row for row in report["files"]}
    assert rows["f32"]["top1_agreement"] == 1.0
    # The same blocks, in transformers, in float32.
    blocks = read_check_blocks(tiny / "held_out.jsonl", TextTokenizer.load(tiny / "model"), 128, 2)
    model = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [model(torch.tensor([b]), labels=torch.tensor([b])).loss.item() for b in blocks]
    expected = math.exp(sum(losses) / len(losses))
    print({t: (round(r["perplexity"], 3), round(r["top1_agreement"], 3)) for t, r in rows.items()})
    assert rows["f32"]["perplexity"] == pytest.approx(expected, rel=1e-3)
    for outtype in QUANTS:
        assert 0.0 <= rows[outtype]["top1_agreement"] <= 1.0
        assert rows[outtype]["perplexity"] == pytest.approx(expected, rel=0.05), outtype
    assert rows["q6_k"]["top1_agreement"] >= rows["q4_0"]["top1_agreement"] - 0.05


def test_without_the_binding_one_line_says_how_to_get_it(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli_main(["export", "--base_model", str(tiny / "model"), "--output_file", str(tmp_path / "m.gguf"),
                  "--outtype", "f16,q4_k_m"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert err[-1] == (
        "error: --outtype q4_k_m is made by llama.cpp's quantizer, through llama-cpp-python, which is not "
        "installed; install it with `pip install 'llama-sft[llamacpp]'` (or `make llama-cpp`)"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("case", "argv", "fragments"),
    [
        ("too little text", ["--outtype", "q4_0", "--check", "TEXT"], ["TEXT: the text holds ", "--check_block_size 512"]),
        ("no such text", ["--outtype", "q4_0", "--check", "TMP/nowhere"], ["TMP/nowhere: --check does not exist"]),
        ("list into a non-.gguf name", ["--outtype", "q8_0,q4_0", "--output_file", "OUT/m.bin"], ["m.bin: name the file NAME.gguf"]),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)  # fmt: skip
def test_bad_check_or_name_is_refused_before_writing(tiny, tmp_path, capsys, case, argv, fragments):
    text = tmp_path / "short.txt"
    text.write_text("only a few words\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    names = {"TEXT": str(text), "TMP": str(tmp_path), "OUT": str(out)}
    argv = [re.sub("TEXT|TMP|OUT", lambda m: names[m[0]], arg) for arg in argv]
    if "--output_file" not in argv:
        argv += ["--output_file", str(out / "m.gguf")]
    with pytest.raises(SystemExit) as exit_:
        cli_main(["export", "--base_model", str(tiny / "model"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[-1].startswith("error: ")
    for fragment in fragments:
        assert re.sub("TEXT|TMP|OUT", lambda m: names[m[0]], fragment) in err[-1], err[-1]
    assert list(out.iterdir()) == []


# ----------------------------------------------------------------------------------- Ollama


def go_render(template: str, system: str | None, messages: list[dict]) -> str:
    """Ollama's Go template, evaluated for the constructs ``ollama_template`` writes: variables,
    if/else if/else, range over .Messages, eq, string literals and fields."""
    parts = re.split(r"\{\{(.*?)\}\}", template)
    tree, stack = [], []
    node = tree
    for number, part in enumerate(parts):
        if number % 2 == 0:
            node.append(("text", part))
            continue
        action = part.strip()
        if action.startswith(("if ", "range ")):
            block = ("block", action, [], [])  # action, body, else branch
            node.append(block)
            stack.append((block, node))
            node = block[2]
        elif action == "else" or action.startswith("else if "):
            block, _ = stack[-1]
            if action == "else":
                node = block[3]
            else:  # an `else if` is an `if` inside the else branch, closed by the same `end`
                inner = ("block", action[5:], [], [])
                block[3].append(inner)
                stack[-1] = (inner, stack[-1][1])
                node = inner[2]
        elif action == "end":
            _, node = stack.pop()
        else:
            node.append(("action", action))

    variables: dict[str, object] = {}

    def value(expr: str, dot: dict):
        expr = expr.strip()
        if expr.startswith("eq "):
            left, right = re.findall(r'"(?:[^"\\]|\\.)*"|\S+', expr[3:])
            return value(left, dot) == value(right, dot)
        if expr.startswith('"'):
            return json.loads(expr)
        if expr in ("true", "false"):
            return expr == "true"
        if expr.startswith("$"):
            return variables[expr]
        return dot.get(expr[1:]) or ""

    def run(nodes, dot) -> str:
        text = ""
        for item in nodes:
            if item[0] == "text":
                text += item[1]
            elif item[0] == "action":
                if m := re.fullmatch(r"(\$\w+) :?= (.+)", item[1]):
                    variables[m[1]] = value(m[2], dot)
                else:
                    text += str(value(item[1], dot))
            elif item[1].startswith("range "):
                for message in value(item[1][6:], dot):
                    text += run(item[2], message)
            else:
                text += run(item[2] if value(item[1][3:], dot) else item[3], dot)
        return text

    return run(tree, {"System": system or "", "Messages": messages})


HISTORY = [("What is 狗 in English?", "dog"), ("And 猫?", "cat")]
QUESTION = "Translate to Chinese: horse"


@pytest.mark.parametrize("name", ["alpaca", "llama2-chat", "chatml", "llama3"])
def test_every_template_in_llama_cpp_and_ollama(tiny, tmp_path, name):
    """A three-turn chat: llama.cpp's chat completion with the template embedded in the GGUF runs
    the ids training gives the same conversation, and the Modelfile's TEMPLATE lays out the same
    text (less the first BOS, which Ollama adds from the file's flag) with the right stop tokens."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tokenizer = TextTokenizer.load(tiny / "model")
    template = load_template(name)
    system = None if name == "alpaca" else "Answer in one word."
    messages = [{"role": "system", "content": system}] if system else []
    for user, answer in HISTORY:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": QUESTION})
    path = export_files(tiny / "model", [], tmp_path / f"{name}.gguf", "q8_0", prompt_template=name)["q8_0"]

    expected = prompt_ids(template, tokenizer, QUESTION, HISTORY, system_prompt=system)
    llm = load_gguf(path, n_ctx=256)
    try:
        reply = llm.create_chat_completion(
            messages=messages, temperature=0.0, max_tokens=2, repeat_penalty=1.0
        )
        used = reply["usage"]["prompt_tokens"]
        ran = [int(t) for t in llm.input_ids[:used]]
        jinja = llm.metadata["tokenizer.chat_template"]
        rendered = Jinja2ChatFormatter(jinja, "</s>", "<s>")(messages=messages).prompt
        tokenized = llm.tokenize(rendered.encode(), add_bos=False, special=True)
        add_bos = llm.metadata["tokenizer.ggml.add_bos_token"]
    finally:
        llm.close()
    if name == "alpaca":
        # "### Response: " ends in a space: rendered as one text, an earlier answer is segmented with
        # that space ("▁dog"), where training encodes the prompt and the answer apart ("▁", "▁dog").
        first = [
            (template.render(HISTORY[0][0]), HISTORY[0][1]),
            (template.render_followup(HISTORY[1][0]), "cat"),
        ]
        joined = [i for prompt, answer in first for i in [1, *tokenizer.encode(prompt + answer), 2]]
        assert ran == joined + [1, *tokenizer.encode(template.render_followup(QUESTION))]
        assert len(ran) == len(expected) - len(HISTORY) and ran[-20:] == expected[-20:]
    elif name == "llama2-chat":
        assert ran == expected
    else:
        # chatml and Llama 3 were made for BPE vocabularies. With a SentencePiece one, llama.cpp starts
        # the text after each turn token with a space piece, where training encodes each piece of the
        # layout apart: the text is the project's rendering, the ids are llama.cpp's segmentation of it.
        assert rendered == render_text(template, [*HISTORY, (QUESTION, None)], system)
        assert ran == tokenized and ran != expected
    assert add_bos == ("false" if template.bos == "none" else "true")

    text = modelfile_path(path).read_text()
    go_template = re.search(r'TEMPLATE """(.*?)"""', text, re.S)[1]
    # Ollama passes every message (system ones too) as .Messages and the system text as .System.
    ollama_messages = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    assert go_render(go_template, system, ollama_messages) == rendered.removeprefix("<s>")
    stops = re.findall(r"^PARAMETER stop (.+)$", text, re.M)
    assert [json.loads(s) for s in stops] == stop_strings(template, "</s>")
    end = template.end_of_turn or "</s>"
    assert json.loads(stops[0]) == end and "</s>" in [json.loads(s) for s in stops]


def test_stop_strings_of_the_builtin_templates():
    wanted = {
        "alpaca": ["</s>", "### Instruction:"],
        "llama2-chat": ["</s>", "[INST]"],
        "chatml": ["<|im_end|>", "</s>", "<|im_start|>user"],
        "llama3": ["<|eot_id|>", "</s>", "<|start_header_id|>user<|end_header_id|>"],
    }
    assert {name: stop_strings(load_template(name), "</s>") for name in wanted} == wanted


# ----------------------------------------------------------------------------------- vLLM


def test_lora_servers_are_told_to_serve_the_merged_model(tmp_path, caplog):
    base = tmp_path / "base"
    write_base(base)
    plain = write_lora(base, tmp_path / "plain", targets=["q_proj", "v_proj"])
    whole = write_lora(
        base, tmp_path / "whole", targets=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]
    )
    model = read_base_model(base)
    assert lora_server_notice([read_adapter(plain, model)], base) is None
    notice = lora_server_notice([read_adapter(plain, model), read_adapter(whole, model)], base)
    assert notice == (
        f"{whole}: saves whole modules (embed_tokens, lm_head: modules_to_save), which vLLM and other LoRA "
        f"servers cannot load with --enable-lora; serve the merged model: llama-sft merge --base_model "
        f"{base} --lora_model {plain},{whole} --output_dir MERGED && vllm serve MERGED"
    )
    with caplog.at_level(logging.INFO, logger="llama_sft"):
        merge(base, [whole], output_dir=tmp_path / "merged")
    said = [r.getMessage() for r in caplog.records if "LoRA servers" in r.getMessage()]
    assert said == [
        f"{whole}: saves whole modules (embed_tokens, lm_head: modules_to_save), which vLLM and other LoRA "
        f"servers cannot load with --enable-lora; serve the merged model: vllm serve {tmp_path / 'merged'}"
    ]


def test_sentencepiece_backed_tokenizer_gives_training_ids_on_chinese_text():
    """The tokenizer setting that gives a server training's ids for Chinese-LLaMA-2: SentencePiece
    itself behind transformers' interface (transformers 4's slow LlamaTokenizer, vLLM's
    --tokenizer-mode slow there; transformers 5's SentencePieceBackend), legacy as shipped. The
    converted tokenizers BPE (transformers 5's only LlamaTokenizer) segments some Chinese otherwise."""
    from transformers import AutoTokenizer, SentencePieceBackend

    folder = shared_path("tokenizers/chinese-llama-2")
    records = json.loads(shared_path("data/alpaca_zh_demo.json").read_text(encoding="utf-8"))
    texts = [r["instruction"] + ("\n" + r["input"] if r.get("input") else "") + r["output"] for r in records]
    ours = TextTokenizer.load(folder)
    slow = SentencePieceBackend(vocab_file=str(folder / "tokenizer.model"), legacy=True)
    fast = AutoTokenizer.from_pretrained(folder)
    expected = [ours.encode(text) for text in texts]
    assert [slow.encode(text, add_special_tokens=False) for text in texts] == expected
    same = sum(
        fast.encode(text, add_special_tokens=False) == ids for text, ids in zip(texts, expected, strict=True)
    )
    print(f"converted (fast) tokenizer: {same} of {len(texts)} records token-identical")
    assert same < len(texts)
    # A prompt as training renders it is the same ids from the SentencePiece-backed tokenizer.
    prompt = load_template("llama2-chat").render(texts[0])
    assert slow.encode(prompt, add_special_tokens=False) == ours.encode(prompt)
