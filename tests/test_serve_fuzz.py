"""Fuzzing the server's request bodies: any body gets a 2xx answer or an OpenAI-shaped 4xx, never a
5xx, and the server lives on. ``make fuzz`` runs it with the fuzz profile of test_fuzz.py."""

from __future__ import annotations

import json

import httpx2 as httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fuzz import FUZZING, PROFILE
from test_serve import MAX_LEN, Live, folders  # noqa: F401  (folders is a fixture used by live)

ROLES = st.sampled_from(["system", "user", "assistant", "tool", "robot", "", None, 3])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
ANY = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
MESSAGE = st.fixed_dictionaries(
    {"role": ROLES, "content": st.one_of(st.text(max_size=60), ANY)},
    optional={"name": ANY, "extra": ANY},
)
FIELDS = {
    "messages": st.one_of(st.lists(MESSAGE, max_size=5), ANY),
    "prompt": st.one_of(st.text(max_size=80), st.lists(st.text(max_size=20), max_size=3), ANY),
    "max_tokens": st.one_of(
        st.integers(min_value=-3, max_value=12), st.integers(min_value=-(2**40), max_value=2**40), ANY
    ),
    "max_completion_tokens": st.one_of(st.integers(min_value=-3, max_value=12), ANY),
    "temperature": st.one_of(st.floats(min_value=-1, max_value=3), ANY),
    "top_p": st.one_of(st.floats(min_value=-1, max_value=2), ANY),
    "stream": st.one_of(st.booleans(), ANY),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=5), ANY),
    "seed": st.one_of(st.integers(min_value=-(2**70), max_value=2**70), ANY),
    "n": st.one_of(st.integers(min_value=-1, max_value=3), ANY),
}


# Right types and ranges: a request made only of these is served.
GOOD = {
    "max_tokens": st.integers(min_value=1, max_value=6),
    "temperature": st.floats(min_value=0, max_value=2),
    "top_p": st.floats(min_value=0.01, max_value=1),
    "stream": st.booleans(),
    "stop": st.one_of(st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=4), max_size=4)),
    "seed": st.integers(min_value=0, max_value=2**31),
    "n": st.just(1),
}


@st.composite
def conversations(draw) -> list[dict]:
    """Valid message lists: an optional system message, then user and assistant turns in order."""
    turns = draw(st.integers(0, 2))
    texts = draw(st.lists(st.text(max_size=40), min_size=2 * turns + 2, max_size=2 * turns + 2))
    messages = [{"role": "system", "content": texts[-1]}] if draw(st.booleans()) else []
    roles = ["user", "assistant"] * turns + ["user"]
    return messages + [{"role": role, "content": text} for role, text in zip(roles, texts, strict=False)]


@st.composite
def bodies(draw, model: str, endpoint: str) -> bytes:
    """A request body: half of them valid requests with some parameters drawn in range, the rest
    with a right or wrong value for any field and unknown fields, or not JSON at all."""
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if endpoint.endswith("chat/completions"):
        body = {"model": model, "messages": draw(conversations())}
    else:
        body = {"model": model, "prompt": draw(st.text(max_size=60))}
    body["max_tokens"] = draw(GOOD["max_tokens"])  # keeps generation short
    if kind < 10:
        for name in draw(st.lists(st.sampled_from(sorted(GOOD)), max_size=3, unique=True)):
            body[name] = draw(GOOD[name])
    else:
        for name, values in FIELDS.items():
            if draw(st.booleans()):
                body[name] = draw(values)
        body.update(draw(st.dictionaries(st.text(max_size=12), ANY, max_size=2)))
        if kind == 19:
            body = draw(ANY)
    return json.dumps(body, allow_nan=True).encode()  # escapes lone surrogates as \ud800


@pytest.fixture(scope="module")
def server(folders):  # noqa: F811  (the fixture imported from test_serve)
    base, lora = folders
    live = Live(["--base_model", str(base), "--lora_model", str(lora), "--max_model_len", str(MAX_LEN)])
    yield live
    live.stop()


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_any_body_gets_an_answer_or_an_openai_shaped_4xx(server, endpoint):
    client = httpx.Client(base_url=server.url, timeout=60)
    statuses = []

    @given(bodies(server.model, endpoint))
    def holds(raw: bytes) -> None:
        with client.stream(
            "POST", endpoint, content=raw, headers={"content-type": "application/json"}
        ) as reply:
            payload = reply.read()
        assert reply.status_code < 500, (raw, payload)
        if reply.status_code >= 400:
            error = json.loads(payload)["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], payload
        elif reply.headers["content-type"].startswith("text/event-stream"):
            events = [line for line in payload.decode().splitlines() if line]
            assert events and events[-1] == "data: [DONE]", payload
        else:
            assert json.loads(payload)["choices"], payload
        statuses.append(reply.status_code)

    examples = PROFILE.max_examples // 10 if FUZZING else 60
    settings(PROFILE, max_examples=examples)(holds)()
    assert client.get("/health").json()["status"] == "ok"
    # Both sides of the contract were exercised: requests served and requests refused.
    assert statuses.count(200) >= examples // 5 and len(set(statuses)) >= 2, sorted(set(statuses))
