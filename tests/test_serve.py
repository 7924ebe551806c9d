"""llama-sft serve against a live server on a free loopback port, through the real openai client."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import torch
import uvicorn
from conftest import corpus
from lora_helpers import write_lora

from llama_sft.data.templates import load_template, prompt_ids
from llama_sft.data.text import clean_text
from llama_sft.loading import load_model
from llama_sft.tools.chat import GenerationSettings, generate_ids
from llama_sft.tools.chat import main as chat_main
from llama_sft.tools.demo import make_model, make_tokenizer
from llama_sft.tools.serve.app import create_app
from llama_sft.tools.serve.command import ServeError, prepare
from llama_sft.tools.serve.command import main as serve_main

MAX_LEN = 160
KEY = "sk-test-5f1c"


@pytest.fixture(scope="module")
def folders(tmp_path_factory, model_dir, tokenizer):
    """The conftest base with a LoRA beside which the tokenizer and the llama2-chat template are saved."""
    lora = write_lora(model_dir, tmp_path_factory.mktemp("serve") / "lora", targets=["q_proj", "v_proj"])
    tokenizer.save(lora)
    load_template("llama2-chat").save(lora)
    return model_dir, lora


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Live:
    """A server started in this process on a free loopback port."""

    def __init__(self, argv: list[str]):
        self.args, self.state = prepare(argv)
        port = free_port()
        config = uvicorn.Config(create_app(self.state), host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"
        self.model = self.state.model_name

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def live(folders):
    base, lora = folders
    server = Live(["--base_model", str(base), "--lora_model", str(lora), "--max_model_len", str(MAX_LEN)])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(folders, tokenizer):
    """The same model, loaded as chat loads it, for answers computed without the server."""
    base, lora = folders
    model = load_model(base, lora, torch.device("cpu"))
    template = load_template(lora)

    def answer(instruction, history=(), system_prompt=None, max_new_tokens=8):
        ids = prompt_ids(template, tokenizer, instruction, list(history), system_prompt)
        settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False)
        return tokenizer.decode(generate_ids(model, tokenizer, ids, settings))

    return answer


def test_greedy_answers_are_chats_over_several_turns(live, folders, reference, tmp_path):
    base, lora = folders
    questions = ["Translate to Chinese: cat", "What is 狗 in English?"]
    (tmp_path / "q.txt").write_text(questions[0] + "\n", encoding="utf-8")
    chat_main(
        ["--base_model", str(base), "--lora_model", str(lora), "--do_sample", "false", "--max_new_tokens", "8",
         "--data_file", str(tmp_path / "q.txt"), "--predictions_file", str(tmp_path / "p.json")]
    )  # fmt: skip
    chat_answer = json.loads((tmp_path / "p.json").read_text(encoding="utf-8"))[0]["output"]
    client = live.client()
    messages = [{"role": "user", "content": questions[0]}]
    first = client.chat.completions.create(model=live.model, messages=messages, temperature=0, max_tokens=8)
    # chat's file mode strips the answer; the reference is chat's generate_ids, unstripped.
    assert first.choices[0].message.content.strip() == chat_answer
    assert first.choices[0].message.content == reference(questions[0])
    assert first.usage.prompt_tokens == len(
        prompt_ids(load_template(lora), live.state.tokenizer, questions[0])
    )
    assert first.usage.completion_tokens == 8 and first.choices[0].finish_reason == "length"
    # A second turn and a system prompt: the earlier answer comes back as text, as any API client sends it.
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": questions[0]},
        {"role": "assistant", "content": chat_answer},
        {"role": "user", "content": questions[1]},
    ]
    second = client.chat.completions.create(model=live.model, messages=messages, temperature=0, max_tokens=8)
    # Message text passes the text policy of data/text.py, control characters removed, as in training.
    expected = reference(questions[1], [(questions[0], clean_text(chat_answer))], "Answer in one word.")
    assert second.choices[0].message.content == expected


def test_streaming_matches_the_whole_answer_and_ends_with_done(live, reference):
    client = live.client()
    messages = [{"role": "user", "content": "Give the Chinese word for ten."}]
    stream = client.chat.completions.create(
        model=live.model,
        messages=messages,
        temperature=0,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference("Give the Chinese word for ten.")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8
    body = {"model": live.model, "messages": messages, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_completions_render_the_raw_prompt(live, tokenizer, folders):
    base, lora = folders
    model = load_model(base, lora, torch.device("cpu"))
    settings = GenerationSettings(max_new_tokens=6, do_sample=False)
    expected = tokenizer.decode(
        generate_ids(model, tokenizer, [tokenizer.bos_id] + tokenizer.encode("猫 is"), settings)
    )
    client = live.client()
    whole = client.completions.create(model=live.model, prompt="猫 is", temperature=0, max_tokens=6)
    assert whole.choices[0].text == expected and whole.object == "text_completion"
    streamed = client.completions.create(
        model=live.model, prompt="猫 is", temperature=0, max_tokens=6, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    # A temperature too small to divide the logits by in float32 (a subnormal) decodes greedily.
    tiny = client.completions.create(
        model=live.model, prompt="猫 is", temperature=2.225073858507e-311, max_tokens=6
    )
    assert tiny.choices[0].text == expected


def test_stop_strings_seed_and_sampling(live, reference):
    client = live.client()
    messages = [{"role": "user", "content": "Translate to Chinese: red"}]
    full = reference("Translate to Chinese: red", max_new_tokens=12)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = client.chat.completions.create(
        model=live.model, messages=messages, temperature=0, max_tokens=12, stop=stop
    )
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"

    def sampled(seed):
        answer = client.chat.completions.create(
            model=live.model, messages=messages, temperature=1.0, top_p=1.0, max_tokens=12, seed=seed
        )
        return answer.choices[0].message.content

    assert sampled(3) == sampled(3)
    assert len({sampled(seed) for seed in range(4)}) > 1


BAD = [
    # (raw body or dict, status, param)
    (b'{"model": "M", "messages": [', 400, None),
    (b"[1, 2]", 400, None),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ({"model": "M"}, 400, "messages"),
    ({"model": "M", "messages": []}, 400, "messages"),
    ({"model": "M", "messages": "hi"}, 400, "messages"),
    ({"model": "M", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "M", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"model": "M", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "M", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400,
     "messages[1].role"),
    ({"model": "M", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400,
     "messages[1].role"),
    ({"model": "M", "messages": [{"role": "user", "content": "a\x00b"}]}, 400, "messages[0].content"),
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": MAX_LEN}, 400,
     "max_completion_tokens"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi " * MAX_LEN}]}, 400, "messages"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 400, "stop"),
    ({"model": "M", "messages": [{"role": "user", "content": "x" * 1_100_000}]}, 413, None),
]  # fmt: skip


@pytest.mark.parametrize("body, status, param", BAD)
def test_bad_requests_get_openai_shaped_4xx(live, body, status, param):
    raw = (
        body if isinstance(body, bytes) else json.dumps(body).replace('"M"', json.dumps(live.model)).encode()
    )
    response = httpx.post(f"{live.url}/v1/chat/completions", content=raw, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"


def test_bad_requests_through_the_client(live):
    client = live.client()
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=live.model, messages=[{"role": "user", "content": "hi"}], max_tokens=0
        )
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=live.model, prompt=["a", "b"])
    assert client.models.list().data[0].id == live.model


def test_concurrent_requests_are_decoded_together(live, reference):
    questions = ["Translate to Chinese: cat", "What is 狗 in English?", "Translate to English: 猫", "hello"]
    client = live.client()
    live.state.engine.peak_running = 0

    def ask(question):
        messages = [{"role": "user", "content": question}]
        answer = client.chat.completions.create(
            model=live.model, messages=messages, temperature=0, max_tokens=24, extra_body={"min_tokens": 24}
        )
        return answer.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, questions))
    assert live.state.engine.peak_running >= 2
    assert answers == [reference(q, max_new_tokens=24) for q in questions]


def test_a_client_gone_mid_stream_leaves_the_batch(live):
    body = {
        "model": live.model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 120,
        "min_tokens": 120,
        "stream": True,
    }
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        next(lines), next(lines)
        assert httpx.get(f"{live.url}/health").json()["running"] == 1
    deadline = time.time() + 5
    while httpx.get(f"{live.url}/health").json()["running"] and time.time() < deadline:
        time.sleep(0.02)
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok", "running": 0, "waiting": 0}


CHATML_ANSWER = "你好，世界。"


@pytest.fixture(scope="module")
def chatml_live(tmp_path_factory):
    """A tiny model served with the chatml template, whose tokenizer has <|im_start|> and <|im_end|>
    as pieces. Its layers add nothing (o_proj and down_proj zero), so the next token depends on the
    current one alone, and its weights are set so that greedy decoding after a chatml prompt says
    CHATML_ANSWER, then <|im_end|>, then CHATML_ANSWER again, and so on: a server that stopped only at
    EOS would keep talking past the end of the turn."""
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("chatml")
    tokenizer = make_tokenizer(folder, corpus(), vocab_size=500, symbols=["<|im_start|>", "<|im_end|>"])
    template = load_template("chatml")
    template.save(folder)
    make_model(folder, len(tokenizer), hidden=32, layers=1, heads=2, intermediate=32)
    end = tokenizer.token_id("<|im_end|>")
    answer = tokenizer.encode(CHATML_ANSWER)
    chat_end = prompt_ids(template, tokenizer, "hi")[-1]  # the "\n" after "<|im_start|>assistant"
    chain = [chat_end, *answer, end, answer[0]]
    assert len(set(chain[:-1])) == len(chain) - 1 and tokenizer.eos_id not in chain
    model = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed[:, : len(chain)] = 0
        head[:, : len(chain)] = 0
        for dim, (token, following) in enumerate(pairwise(chain)):
            embed[token, dim] = 1.0  # after RMSNorm about sqrt(32) in this dimension, the rest near 0
            head[following, dim] = 100.0
    model.save_pretrained(folder)
    server = Live(["--model", str(folder)])
    yield server, tokenizer, folder
    server.stop()


def test_answers_stop_at_the_templates_end_of_turn_token(chatml_live):
    """chatml's <|im_end|> ends the answer as EOS does, on both endpoints, streamed or not, and in a
    batch with another request; it is not part of the text and finish_reason is "stop"."""
    live, tokenizer, folder = chatml_live
    client = live.client()
    length = len(tokenizer.encode(CHATML_ANSWER))
    # chat stops there by the same Template.stop_ids.
    template = load_template(folder)
    settings = GenerationSettings(max_new_tokens=40, do_sample=False)
    ids = generate_ids(
        load_model(folder, None, torch.device("cpu")),
        tokenizer,
        prompt_ids(template, tokenizer, "hi"),
        settings,
        stop_ids=template.stop_ids(tokenizer),
    )
    assert tokenizer.decode(ids) == CHATML_ANSWER and len(ids) == length
    messages = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model=live.model, messages=messages, temperature=0, max_tokens=40)
    assert whole.choices[0].message.content == CHATML_ANSWER
    assert whole.choices[0].finish_reason == "stop" and whole.usage.completion_tokens == length
    chunks = list(
        client.chat.completions.create(
            model=live.model, messages=messages, temperature=0, max_tokens=40, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == CHATML_ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # A raw completion prompt in the chatml layout stops there too.
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    text = client.completions.create(model=live.model, prompt=prompt, temperature=0, max_tokens=40)
    assert (text.choices[0].text, text.choices[0].finish_reason) == (CHATML_ANSWER, "stop")
    streamed = list(
        client.completions.create(model=live.model, prompt=prompt, temperature=0, max_tokens=40, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == CHATML_ANSWER
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "stop"
    # min_tokens holds the end-of-turn token off as it holds EOS off.
    held = client.chat.completions.create(
        model=live.model,
        messages=messages,
        temperature=0,
        max_tokens=length + 3,
        extra_body={"min_tokens": length + 3},
    )
    assert held.choices[0].finish_reason == "length" and held.usage.completion_tokens == length + 3
    assert held.choices[0].message.content.startswith(CHATML_ANSWER)
    assert "<|im_end|>" not in held.choices[0].message.content
    # In the batch: a long request keeps a row running while short ones join it, end and leave.
    live.state.engine.peak_running = 0
    body = {"model": live.model, "messages": messages, "max_tokens": 1500, "min_tokens": 1500, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        next(lines), next(lines)

        def ask(_):
            answer = client.chat.completions.create(
                model=live.model, messages=messages, temperature=0, max_tokens=40
            )
            return answer.choices[0].message.content, answer.choices[0].finish_reason

        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(ask, range(3))) == [(CHATML_ANSWER, "stop")] * 3
        assert live.state.engine.peak_running >= 2
    deadline = time.time() + 5
    while httpx.get(f"{live.url}/health").json()["running"] and time.time() < deadline:
        time.sleep(0.02)
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok", "running": 0, "waiting": 0}


def test_api_key_is_required_when_set(folders):
    base, lora = folders
    server = Live(
        ["--base_model", str(base), "--lora_model", str(lora), "--api_key", KEY, "--max_model_len", "64"]
    )
    try:
        for key in ("none", KEY + "x"):
            with pytest.raises(openai.AuthenticationError) as caught:
                server.client(key).models.list()
            assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
        answer = server.client(KEY).chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert answer.usage.completion_tokens <= 2
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/").status_code == 200
    finally:
        server.stop()


def test_other_hosts_need_a_key(folders, capsys, caplog):
    base, lora = folders
    argv = ["--base_model", str(base), "--lora_model", str(lora), "--host", "0.0.0.0"]
    with pytest.raises(SystemExit) as caught:
        serve_main(argv)
    assert caught.value.code == 2
    assert "--api_key" in capsys.readouterr().err
    with pytest.raises(ServeError, match="--model DIR"):
        prepare(["--lora_model", str(lora)])
    _, state = prepare([*argv, "--allow_no_auth"])
    state.engine.close()
    assert "without an API key" in caplog.text


def test_yaml_config(folders, tmp_path):
    base, lora = folders
    config = tmp_path / "serve.yaml"
    config.write_text(f"base_model: {base}\nlora_model: [{lora}]\nmax_batch_size: 3\nport: 9123\n")
    args, state = prepare(["--config", str(config), "--port", "9124"])
    state.engine.close()
    assert (args.max_batch_size, args.port, state.model_name) == (3, 9124, lora.name)


def test_chat_page_streams_an_answer_in_a_browser(live, tmp_path):
    """Types a question into the page at / in headless Chromium and waits for the streamed answer."""
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them)")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,700"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    browser = webdriver.Chrome(options=options, service=service)
    try:
        browser.get(live.url + "/")
        WebDriverWait(browser, 20).until(lambda b: live.model in b.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "system").send_keys("Answer briefly.")
        for name, value in (("temperature", "0"), ("max_tokens", "12")):
            browser.find_element(By.ID, name).clear()
            browser.find_element(By.ID, name).send_keys(value)
        for question in ("Translate to Chinese: cat", "What is 狗 in English?"):
            browser.find_element(By.ID, "input").send_keys(question + "\n")
            WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "send").is_enabled())
        bubbles = browser.find_elements(By.CSS_SELECTOR, ".msg")
        assert [b.get_attribute("class") for b in bubbles] == ["msg user", "msg assistant"] * 2
        assert all(b.text.strip() for b in bubbles)
        screenshot = Path(os.environ.get("LLAMA_SFT_SCREENSHOT", tmp_path / "page.png"))
        browser.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 1000
        browser.find_element(By.ID, "new").click()
        assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    finally:
        browser.quit()
