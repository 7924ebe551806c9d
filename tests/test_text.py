"""The text policy (data/text.py), class by class, and that training's records and chat apply it alike."""

from __future__ import annotations

import io
import json
import logging

import pytest

from llama_sft.data.records import DataError, load_records
from llama_sft.data.templates import Template, TemplateError
from llama_sft.data.text import UnencodableText, clean_text
from llama_sft.tools.chat import ChatError, read_instructions
from llama_sft.tools.chat import main as chat_main


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("a\ud800b", "ab"),  # a lone high surrogate: half an emoji
        ("a\udc80b", "ab"),  # a lone low surrogate: an undecodable byte read with surrogateescape
        ("x\ud83d\ude00y", "x😀y"),  # a pair as two code points is one character, kept
        ("red\x1b[31m text\x1b[0m", "red[31m text[0m"),
        ("page 1\x0cpage 2\x0bline\x85end", "page 1\npage 2\nline\nend"),
        ("del\x7f and c1\x9f", "del and c1"),
        ("tab\tnewline\ncr\r\n你好 😀 \ufeff\u2028", "tab\tnewline\ncr\r\n你好 😀 \ufeff\u2028"),
    ],
)
def test_cleaned_classes(text, cleaned):
    assert clean_text(text) == cleaned


def test_nul_is_refused():
    with pytest.raises(
        UnencodableText, match=r"NUL character \(U\+0000\) at character 3.*re-export it as UTF-8"
    ):
        clean_text("abc\x00def")


def test_records_cleaned_with_one_warning_and_nul_refused(tmp_path, caplog):
    path = tmp_path / "crawl.jsonl"
    lines = [
        {"instruction": "a\ud800b", "input": "\x1b", "output": "x"},
        {"instruction": "fine", "output": "y"},
        {"instruction": "c", "output": "\udfff"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        records = load_records(path)
    assert [(r.instruction, r.input, r.output) for r in records] == [
        ("ab", "", "x"),
        ("fine", "", "y"),
        ("c", "", ""),
    ]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: removed lone surrogates or control characters from 2 record(s) (record 0, record 2); "
        "see the Data section of the README"
    ]
    path = tmp_path / "crawl.json"
    path.write_text(
        json.dumps([{"instruction": "ok", "output": "y"}, {"instruction": "a\x00b", "output": "z"}])
    )
    with pytest.raises(DataError, match=r"crawl.json, record 1: 'instruction' holds a NUL character"):
        load_records(path)


def test_templates_and_system_prompts(caplog):
    with caplog.at_level(logging.WARNING):
        template = Template(name="t", prompt="\ud800{instruction}", system_prompt="sys\x1b")
    assert (template.prompt, template.system_prompt) == ("{instruction}", "sys")
    assert len(caplog.records) == 2
    with pytest.raises(TemplateError, match=r"prompt template 't': 'system_prompt' holds a NUL"):
        Template(name="t", prompt="{instruction}", system_prompt="a\x00")


def test_chat_data_file(tmp_path, caplog):
    text_file = tmp_path / "questions.txt"
    text_file.write_text("first \x1b[1mbold\n\nsec\x7fond\n", encoding="utf-8")
    assert read_instructions(text_file) == [
        {"instruction": "first [1mbold", "input": ""},
        {"instruction": "second", "input": ""},
    ]
    alpaca = tmp_path / "questions.json"
    alpaca.write_text(json.dumps([{"instruction": "q\ud800", "input": "i\x7f"}]))
    with caplog.at_level(logging.WARNING):
        assert read_instructions(alpaca) == [{"instruction": "q", "input": "i"}]
    assert "from 1 record(s) (record 0)" in caplog.records[-1].getMessage()
    alpaca.write_text(json.dumps([{"instruction": "q", "input": "\x00"}]))
    with pytest.raises(ChatError, match=r"questions.json, record 0: holds a NUL character"):
        read_instructions(alpaca)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ChatError, match=r"latin1.txt: not valid UTF-8 at byte 3; re-save the file as UTF-8"):
        read_instructions(tmp_path / "latin1.txt")


def test_chat_interactive(model_dir, tokenizer_dir):
    stdin = io.StringIO("a\ud800b\nbad \x00 line\nhello\n/exit\n")
    stdout = io.StringIO()
    argv = ["--base_model", str(model_dir), "--tokenizer_path", str(tokenizer_dir)]
    chat_main([*argv, "--do_sample", "false", "--max_new_tokens", "2"], stdin=stdin, stdout=stdout)
    shown = stdout.getvalue()
    assert shown.count(">>> ") == 4
    assert "(not sent: the instruction holds a NUL character (U+0000) at character 4" in shown
