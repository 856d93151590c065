"""The OpenAI-compatible server over real HTTP: a `tokenmill serve` subprocess on 127.0.0.1 with a random
free port, driven by the official `openai` client and by httpx.

Most tests use the tiny random model (fast); `integration` tests use the real default model."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

SERVE_TIMEOUT_S = 120.0


# ---- a server subprocess ----------------------------------------------------------------------------------
class ServerProcess:
    """`python -m tokenmill.entrypoints.cli serve MODEL --port 0 ...`, its output in a log file; the URL
    is read from its startup log line."""

    def __init__(self, model: str | None, log_path: Path, *extra: str):
        self.args = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve"]
        if model is not None:
            self.args.append(model)
        self.args += ["--host", "127.0.0.1", "--port", "0", "--threads", "1", *extra]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> ServerProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while time.monotonic() < deadline:
            m = re.search(r"serving \S+ at (http://\S+) ", self.log())
            if m:
                self.url = m.group(1)
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start:\n{self.log()[-5000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


TINY_ARGS = ("--kv-cache-memory", "16MiB", "--max-model-len", "256")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("srv") / "server.log"
    with ServerProcess(
        str(tiny_model_dir), log, *TINY_ARGS, "--enable-docs"
    ) as srv:  # the fuzz reads the schema
        yield srv
        assert srv.proc.poll() is None, f"server died:\n{srv.log()[-5000:]}"


@pytest.fixture(scope="module")
def model_name(tiny_model_dir) -> str:
    return Path(tiny_model_dir).name


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def tokenize(http: httpx.Client, **body) -> list[int]:
    r = http.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def metrics(http: httpx.Client) -> dict[str, float]:
    text = http.get("/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def assert_error(r: httpx.Response, status: int, param: str | None = "?") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param != "?":
        assert err["param"] == param, err
    assert "Traceback" not in err["message"]
    return err


# ---- basics ---------------------------------------------------------------------------------------------------
def test_models_health_tokenize(http, client, model_name):
    assert http.get("/health").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]
    r = http.post("/tokenize", json={"prompt": "Hello world"})
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] == 256
    r = http.post("/detokenize", json={"tokens": body["tokens"]})
    assert r.json() == {"prompt": "Hello world"}
    chat = tokenize(http, messages=[{"role": "user", "content": "hi"}])
    assert len(chat) > 3
    assert_error(http.post("/tokenize", json={}), 400)
    assert_error(http.post("/detokenize", json={"tokens": [10**9]}), 400, "tokens")
    metrics_text = http.get("/metrics").text
    assert "tokenmill_kv_blocks_total" in metrics_text and "tokenmill_kv_cache_usage_bytes" in metrics_text
    assert 'tokenmill_kv_cache_info{format="fp32",policy="full"} 1.0' in metrics_text
    assert "tokenmill_kv_evicted_tokens 0.0" in metrics_text


def test_completion_usage_and_logprobs(client, http, model_name):
    prompt = "The quick brown fox"
    r = client.completions.create(
        model=model_name, prompt=prompt, max_tokens=12, logprobs=3, extra_body={"ignore_eos": True}
    )
    choice = r.choices[0]
    assert choice.finish_reason == "length" and r.object == "text_completion"
    lp = choice.logprobs
    assert r.usage.completion_tokens == 12 == len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert r.usage.prompt_tokens == len(tokenize(http, prompt=prompt))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(3 <= len(top) <= 4 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    if not any("\ufffd" in t for t in lp.tokens):  # a token may be a fragment of a UTF-8 character
        assert "".join(lp.tokens) == choice.text


def test_completion_stream_matches_nonstream(client, model_name):
    kwargs = dict(model=model_name, prompt="Once upon a time", max_tokens=16, temperature=0)
    full = client.completions.create(**kwargs, extra_body={"ignore_eos": True})
    chunks = list(
        client.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completion_prompt_forms_and_echo(client, http, model_name):
    ids = tokenize(http, prompt="Hello there")
    r = client.completions.create(model=model_name, prompt=ids, max_tokens=3, echo=True)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].text.startswith("Hello there")
    r = client.completions.create(
        model=model_name, prompt=["a b c", "d e"], max_tokens=2, n=2, extra_body={"ignore_eos": True}
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens == len(tokenize(http, prompt="a b c")) + len(tokenize(http, prompt="d e"))
    r = client.completions.create(model=model_name, prompt=[ids, ids[:1]], max_tokens=2)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == len(ids) + 1
    stream = client.completions.create(
        model=model_name, prompt=["x y", "z"], max_tokens=4, stream=True, echo=True
    )
    texts: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts[0].startswith("x y") and texts[1].startswith("z")


def test_chat_nonstream_and_stream(client, http, model_name):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something."},
        {"role": "assistant", "content": "Something."},
        {"role": "user", "content": "Again."},
    ]
    kwargs = dict(model=model_name, messages=messages, temperature=0, max_completion_tokens=10)
    full = client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True})
    assert full.object == "chat.completion"
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert full.usage.prompt_tokens == len(tokenize(http, messages=messages))
    assert full.usage.completion_tokens == 10 and full.choices[0].finish_reason == "length"
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]


def test_n2_both_endpoints(client, model_name):
    r = client.completions.create(model=model_name, prompt="Hi", n=2, max_tokens=5, seed=3, temperature=1)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 10 or all(c.finish_reason == "stop" for c in r.choices)
    stream = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Hi"}],
        n=2,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    texts, finishes, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert finishes == {0: "length", 1: "length"} and usage.completion_tokens == 10
    assert texts[0] and texts[1]


def test_stop_strings(client, model_name):
    kwargs = dict(model=model_name, prompt="Tell me a story", temperature=0, extra_body={"ignore_eos": True})
    original = client.completions.create(**kwargs, max_tokens=24).choices[0].text
    stop = original[len(original) // 2 : len(original) // 2 + 3]
    assert stop
    expected = original[: original.find(stop)]
    r = client.completions.create(**kwargs, max_tokens=24, stop=[stop, "\x00never"])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == expected
    streamed = client.completions.create(**kwargs, max_tokens=24, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_logprobs(client, model_name):
    r = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 6 == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert isinstance(entry.bytes, list)
    # bytes are exact even for tokens that are fragments of a UTF-8 character
    joined = b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="ignore")
    assert joined == r.choices[0].message.content
    stream = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=1,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    streamed = [
        e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_seed_reproducible(client, model_name):
    kwargs = dict(model=model_name, prompt="Random words:", max_tokens=16, temperature=1.0)
    a = client.completions.create(**kwargs, seed=1234).choices[0].text
    b = client.completions.create(**kwargs, seed=1234).choices[0].text
    c = client.completions.create(**kwargs, seed=4321).choices[0].text
    assert a == b
    assert a != c
    chat = dict(model=model_name, messages=[{"role": "user", "content": "x"}], max_tokens=8, temperature=1.0)
    assert (
        client.chat.completions.create(**chat, seed=7).choices[0].message.content
        == client.chat.completions.create(**chat, seed=7).choices[0].message.content
    )


def test_openai_client_errors(client, model_name):
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "x"}], temperature=3
        )
    assert exc.value.body["param"] == "temperature"


# ---- bad input -----------------------------------------------------------------------------------------------
LONG_PROMPT = "word " * 400  # > 256 tokens of context

BAD_COMPLETIONS = [
    ("malformed json", b'{"prompt": "x", ', 400, None),
    ("not an object", b'["prompt"]', 400, None),
    ("empty body", b"", 400, None),
    ("non-utf8 bytes", b'{"prompt": "\xff\xfe\xfa"}', 400, None),
    ("missing prompt", {"max_tokens": 3}, 400, "prompt"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("empty prompt list", {"prompt": []}, 400, "prompt"),
    ("empty token list", {"prompt": [[]]}, 400, "prompt"),
    ("prompt wrong type", {"prompt": 42}, 400, "prompt"),
    ("prompt bool ids", {"prompt": [True, False]}, 400, "prompt"),
    ("token id out of vocab", {"prompt": [10**7]}, 400, "prompt"),
    ("negative token id", {"prompt": [-1]}, 400, "prompt"),
    ("prompt over context", {"prompt": LONG_PROMPT, "max_tokens": 1}, 400, "prompt"),
    ("max_tokens negative", {"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens zero", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens absurd", {"prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
    ("max_tokens string", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens float", {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ("temperature high", {"prompt": "x", "temperature": 5}, 400, "temperature"),
    ("temperature negative", {"prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ("top_p zero", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_p above one", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("top_k below -1", {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("min_p above one", {"prompt": "x", "min_p": 2}, 400, "min_p"),
    ("n zero", {"prompt": "x", "n": 0}, 400, "n"),
    ("n huge", {"prompt": "x", "n": 100000}, 400, "n"),
    ("logprobs too many", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("logprobs negative", {"prompt": "x", "logprobs": -1}, 400, "logprobs"),
    ("presence_penalty range", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("repetition_penalty zero", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("huge stop list", {"prompt": "x", "stop": [f"s{i}" for i in range(1000)]}, 400, "stop"),
    ("empty stop string", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("stop wrong type", {"prompt": "x", "stop": 5}, 400, "stop"),
    ("seed out of int64", {"prompt": "x", "seed": 2**70}, 400, "seed"),
    ("stream wrong type", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("stream_options without stream", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, None),
    ("unknown model", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("min_tokens above max_tokens", {"prompt": "x", "max_tokens": 2, "min_tokens": 5}, 400, "min_tokens"),
    ("kv_policy unknown", {"prompt": "x", "kv_policy": "lru:budget=3"}, 400, "kv_policy"),
    ("kv_policy budget", {"prompt": "x", "kv_policy": "h2o:budget=2.5"}, 400, "kv_policy"),
    ("logit_bias key", {"prompt": "x", "logit_bias": {"one": 5}}, 400, "logit_bias"),
    ("logit_bias value", {"prompt": "x", "logit_bias": {"1": 500}}, 400, "logit_bias"),
]

BAD_CHAT = [
    ("empty messages", {"messages": []}, 400, "messages"),
    ("missing messages", {"max_tokens": 1}, 400, "messages"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("message not object", {"messages": ["hello"]}, 400, "messages"),
    ("content wrong type", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    (
        "image part",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        None,
    ),
    ("prompt over context", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "messages"),
    (
        "top_logprobs without logprobs",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        None,
    ),
    (
        "top_logprobs too many",
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 50},
        400,
        None,
    ),
    ("logprobs int", {"messages": [{"role": "user", "content": "x"}], "logprobs": 3}, 400, "logprobs"),
    (
        "max_completion_tokens absurd",
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10**9},
        400,
        None,
    ),
    ("unknown model", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    (
        "tools",
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        400,
        "tools",
    ),
]


@pytest.mark.parametrize(
    "path,case",
    [("/v1/completions", c) for c in BAD_COMPLETIONS] + [("/v1/chat/completions", c) for c in BAD_CHAT],
    ids=lambda x: x[0] if isinstance(x, tuple) else x,
)
def test_bad_input(http, path, case):
    _, body, status, param = case
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    err = assert_error(r, status)
    if param is not None:
        assert err["param"] is not None and err["param"].split(".")[0] == param, err


def test_kv_policy_per_request(http):
    """A request may bring its own eviction policy (an extra field, like vLLM's extra sampling fields)."""
    prompt = "The grass is green. The sky is blue. " * 12 + "What color is the sky?"
    r = http.post(
        "/v1/completions",
        json={"prompt": prompt, "max_tokens": 4, "temperature": 0, "kv_policy": "snapkv:budget=0.5,window=8"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4


def test_bad_input_then_normal_request_succeeds(http):
    # Unrouted paths and methods also answer with the error body; then the server still works.
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/completions"), 405)
    assert_error(http.post("/v1/completions", content=b"\x00\x01garbage"), 415)  # no JSON content type
    assert_error(
        http.post(
            "/v1/completions", content=b"\x00\x01garbage", headers={"content-type": "application/json"}
        ),
        400,
    )
    r = http.post("/v1/completions", json={"prompt": "fine", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_default_max_tokens_fills_context(http):
    ids = tokenize(http, prompt="Hello")
    r = http.post("/v1/completions", json={"prompt": ids, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 256 - len(ids)
    assert r.json()["choices"][0]["finish_reason"] == "length"


# ---- concurrency, disconnects, metrics ------------------------------------------------------------------------
def test_concurrent_streams_with_disconnects(server, http):
    rng = random.Random(0)
    num_clients = 50
    plans = []
    for i in range(num_clients):
        chat = i % 2 == 0
        plans.append(
            {
                "chat": chat,
                "max_tokens": rng.randint(8, 24),
                "disconnect_after": rng.randint(1, 4) if i % 3 == 0 else None,
                "prompt": f"client {i} says " + "hello " * rng.randint(1, 20),
            }
        )

    async def run_client(client: httpx.AsyncClient, plan: dict) -> dict:
        if plan["chat"]:
            path = "/v1/chat/completions"
            body = {"messages": [{"role": "user", "content": plan["prompt"]}]}
        else:
            path, body = "/v1/completions", {"prompt": plan["prompt"]}
        body.update(
            max_tokens=plan["max_tokens"],
            stream=True,
            ignore_eos=True,
            stream_options={"include_usage": True},
        )
        result = {"finish": None, "usage": None, "done": False, "events": 0}
        async with client.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                result["events"] += 1
                if plan["disconnect_after"] is not None and result["events"] >= plan["disconnect_after"]:
                    return result  # leaves the stream unread: httpx closes the connection
                data = line[len("data: ") :]
                if data == "[DONE]":
                    result["done"] = True
                    continue
                chunk = json.loads(data)
                assert "error" not in chunk, chunk
                for c in chunk["choices"]:
                    result["finish"] = c["finish_reason"] or result["finish"]
                result["usage"] = chunk.get("usage") or result["usage"]
        return result

    async def main() -> list[dict]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(run_client(client, p) for p in plans))

    results = asyncio.run(main())
    completed = 0
    for plan, result in zip(plans, results, strict=True):
        if plan["disconnect_after"] is None:
            assert result["done"] and result["finish"] == "length", result
            assert result["usage"]["completion_tokens"] == plan["max_tokens"], (plan, result)
            completed += 1
    assert completed == num_clients - len([p for p in plans if p["disconnect_after"] is not None])

    deadline = time.monotonic() + 20
    while True:
        m = metrics(http)
        idle = (
            m["tokenmill_kv_blocks_used"] == 0
            and m["tokenmill_num_requests_running"] == 0
            and m["tokenmill_num_requests_waiting"] == 0
        )
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert idle, {k: v for k, v in m.items() if "blocks" in k or "num_requests" in k}
    assert m['tokenmill_requests_total{outcome="abort"}'] >= 1
    assert m['tokenmill_requests_total{outcome="finished_length"}'] >= completed
    assert m["tokenmill_generation_tokens_total"] > 0 and m["tokenmill_time_to_first_token_seconds_count"] > 0


def test_nonstreaming_disconnect_aborts(server, http):
    before = metrics(http)['tokenmill_requests_total{outcome="abort"}']
    body = {"prompt": "a long answer", "max_tokens": 250, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = metrics(http)
        if m['tokenmill_requests_total{outcome="abort"}'] > before and m["tokenmill_kv_blocks_used"] == 0:
            break
        time.sleep(0.1)
    assert m['tokenmill_requests_total{outcome="abort"}'] == before + 1
    assert m["tokenmill_kv_blocks_used"] == 0 and m["tokenmill_num_requests_running"] == 0


# ---- AsyncLLMEngine in-process --------------------------------------------------------------------------------
def test_async_engine_admission_abort_failure_shutdown(tiny_model_dir):
    from tokenmill.engine.async_engine import AsyncLLMEngine, EngineError, EngineShuttingDownError
    from tokenmill.sampling_params import SamplingParams

    async def wait_idle(eng: AsyncLLMEngine) -> None:
        for _ in range(200):
            s = eng.stats
            if s.kv_blocks_used == 0 and s.num_requests_running == 0 and s.num_requests_waiting == 0:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(eng.stats)

    async def main() -> None:
        eng = AsyncLLMEngine.from_engine_args(str(tiny_model_dir), kv_cache_memory="16MiB", max_model_len=64)
        # Admission errors come out of add_request / the first __anext__, before any output.
        with pytest.raises(ValueError, match="prompt has"):
            await eng.add_request("word " * 100, SamplingParams(max_tokens=1))
        with pytest.raises(ValueError):
            await anext(eng.generate([10**8], SamplingParams(max_tokens=1)))
        # Leaving a stream early aborts the request and frees its blocks.
        agen = eng.generate("hello", SamplingParams(max_tokens=40, ignore_eos=True))
        async for out in agen:
            if len(out.token_ids) >= 3:
                break
        await agen.aclose()
        await wait_idle(eng)
        outs = [o async for o in eng.generate("hello", SamplingParams(max_tokens=5, ignore_eos=True))]
        assert outs[-1].finished and len(outs[-1].token_ids) == 5 and outs[-1].finish_reason == "length"
        # A failing step fails the streams in flight (no hang); the engine then serves again.
        real_step = eng.engine.step

        def boom():
            eng.engine.step = real_step
            raise RuntimeError("boom")

        eng.engine.step = boom
        with pytest.raises(EngineError):
            async for _ in eng.generate("hello", SamplingParams(max_tokens=5)):
                pass
        await wait_idle(eng)
        outs = [o async for o in eng.generate("again", SamplingParams(max_tokens=3, ignore_eos=True))]
        assert len(outs[-1].token_ids) == 3
        # Shutdown lets the request in flight finish, then refuses new ones and stops the thread.
        stream = await eng.add_request("last one", SamplingParams(max_tokens=30, ignore_eos=True))

        async def consume() -> RequestOutputT:
            last = None
            async for last in stream:  # noqa: B007
                pass
            return last

        consumer = asyncio.ensure_future(consume())
        await asyncio.sleep(0)
        await eng.shutdown(timeout=30)
        last = await consumer
        assert last.finish_reason == "length" and len(last.token_ids) == 30
        with pytest.raises(EngineShuttingDownError):
            await eng.add_request("x")
        assert not eng.is_running

    RequestOutputT = object  # noqa: N806
    asyncio.run(main())


def test_async_engine_loop_crash_fails_streams(tiny_model_dir):
    from tokenmill.engine.async_engine import AsyncLLMEngine, EngineDeadError
    from tokenmill.sampling_params import SamplingParams

    async def main() -> None:
        eng = AsyncLLMEngine.from_engine_args(str(tiny_model_dir), kv_cache_memory="16MiB", max_model_len=64)
        stream = await eng.add_request("hello", SamplingParams(max_tokens=50, ignore_eos=True))

        def crash() -> None:
            raise RuntimeError("a bug in the loop")

        eng._publish_stats = crash  # the next loop iteration crashes outside engine.step()
        with pytest.raises(EngineDeadError):
            async with asyncio.timeout(30):
                async for _ in stream:
                    pass
        assert eng.is_dead and not eng.accepting
        with pytest.raises(EngineDeadError):
            await eng.add_request("x")
        await eng.shutdown(timeout=1)

    asyncio.run(main())


def test_500_has_no_trace(tiny_model_dir):
    from tokenmill.entrypoints.openai import build_app

    app = build_app(model=str(tiny_model_dir), kv_cache_memory="16MiB", max_model_len=64)

    def boom(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    app.state.serving.tokenize = boom

    async def main() -> None:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.post("/tokenize", json={"prompt": "x"})
            err = assert_error(r, 500, None)
            assert "secret" not in r.text and err["type"] == "server_error"
            r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        await app.state.engine.shutdown(timeout=5)

    asyncio.run(main())


# ---- 429, SIGTERM --------------------------------------------------------------------------------------------
def test_queue_full_429(tiny_model_dir, tmp_path):
    args = (*TINY_ARGS, "--max-waiting", "1", "--max-num-seqs", "1")
    with ServerProcess(str(tiny_model_dir), tmp_path / "server.log", *args) as srv:

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
                body = {"prompt": "busy busy", "max_tokens": 48, "ignore_eos": True}
                return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(6)))

        responses = asyncio.run(main())
        statuses = sorted(r.status_code for r in responses)
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}, statuses
        for r in responses:
            if r.status_code == 429:
                err = assert_error(r, 429)
                assert err["code"] == "rate_limit_exceeded"
            else:
                assert r.json()["usage"]["completion_tokens"] == 48
        with httpx.Client(base_url=srv.url) as http:
            m = metrics(http)
        assert m['tokenmill_requests_total{outcome="rejected"}'] == statuses.count(429)


def test_sigterm_lets_inflight_request_finish(tiny_model_dir, tmp_path):
    srv = ServerProcess(str(tiny_model_dir), tmp_path / "server.log", *TINY_ARGS).start()
    try:
        body = {"prompt": "long story", "max_tokens": 150, "ignore_eos": True, "stream": True}
        body["stream_options"] = {"include_usage": True}
        usage, finish, done, signalled = None, None, False, False
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if not signalled:
                        srv.proc.send_signal(signal.SIGTERM)
                        signalled = True
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        done = True
                        continue
                    chunk = json.loads(data)
                    usage = chunk.get("usage") or usage
                    for c in chunk["choices"]:
                        finish = c["finish_reason"] or finish
        assert done and finish == "length" and usage["completion_tokens"] == 150
        # No new connection is accepted once it is draining or gone.
        try:
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=5)
            assert r.status_code == 503
        except httpx.TransportError:
            pass
        assert srv.proc.wait(timeout=30) == 0, srv.log()[-3000:]
        assert "received SIGTERM" in srv.log()
    finally:
        srv.stop()


# ---- property-based fuzz of the two POST endpoints from the app's own OpenAPI schema ----------------------------
FUZZ_MAX_TOKENS = 4


def _shorten(body: object) -> None:
    """Keep generations short so that the tiny model answers fast (the fuzz is about validation)."""
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value > FUZZ_MAX_TOKENS:
            body[key] = FUZZ_MAX_TOKENS
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 4:
        body["n"] = 4


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fuzz_no_5xx(server, path):
    """Positive and negative cases generated by schemathesis from /openapi.json: never a 5xx, and every
    error has the OpenAI body. (schemathesis' own pytest plugin does not work with pytest 9, so the
    operation's hypothesis strategy is driven directly.)"""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    operation = schemathesis.openapi.from_url(server.url + "/openapi.json")[path]["POST"]
    modes = schemathesis.GenerationMode
    strategy = st.one_of(operation.as_strategy(modes.POSITIVE), operation.as_strategy(modes.NEGATIVE))
    seen: dict[int, int] = {}

    @given(case=strategy)
    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def check(case) -> None:
        _shorten(case.body)
        response = case.call(timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert any(400 <= code < 500 for code in seen), seen


def _valid_body_strategy(chat: bool):
    """Bodies within every documented range (most should succeed): exercises the generation paths with
    random parameter combinations rather than validation."""
    from hypothesis import strategies as st

    def opt(strategy):
        return st.one_of(st.none(), strategy)

    short_text = st.text(min_size=1, max_size=40)
    fields = {
        "temperature": opt(st.floats(0, 2)),
        "top_p": opt(st.floats(0.01, 1)),
        "top_k": opt(st.integers(-1, 50)),
        "min_p": opt(st.floats(0, 1)),
        "presence_penalty": opt(st.floats(-2, 2)),
        "frequency_penalty": opt(st.floats(-2, 2)),
        "repetition_penalty": opt(st.floats(0.1, 10)),
        "seed": opt(st.integers(-(2**63), 2**63 - 1)),
        "stop": st.one_of(
            st.none(), st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=4), max_size=3)
        ),
        "n": st.integers(1, 3),
        "ignore_eos": st.booleans(),
        "stream": st.booleans(),
    }
    if chat:
        message = st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=40)}
        )
        required = {"messages": st.lists(message, min_size=1, max_size=4)}
        required["max_completion_tokens"] = st.integers(1, FUZZ_MAX_TOKENS)
        fields.update(logprobs=st.booleans(), top_logprobs=opt(st.integers(0, 5)))
    else:
        prompt = st.one_of(
            short_text,
            st.lists(short_text, min_size=1, max_size=3),
            st.lists(st.integers(0, 49151), min_size=1, max_size=20),
            st.lists(st.lists(st.integers(0, 49151), min_size=1, max_size=8), min_size=1, max_size=2),
        )
        required = {"prompt": prompt, "max_tokens": st.integers(1, FUZZ_MAX_TOKENS)}
        fields.update(echo=st.booleans(), logprobs=opt(st.integers(0, 5)))
    return st.fixed_dictionaries(required, optional=fields)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fuzz_valid_bodies(http, path):
    from hypothesis import HealthCheck, given, settings

    seen: dict[int, int] = {}

    @given(body=_valid_body_strategy(chat="chat" in path))
    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(body: dict) -> None:
        r = http.post(path, json=body)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code in (200, 400), (body, r.status_code, r.text[:500])
        if r.status_code == 400:
            assert_error(r, 400)
            return
        if body.get("stream"):
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1]), r.text
        else:
            data = r.json()
            num_prompts = (
                len(body["prompt"])
                if isinstance(body.get("prompt"), list) and not isinstance(body["prompt"][0], int)
                else 1
            )
            assert len(data["choices"]) == body.get("n", 1) * num_prompts
            assert all(c["finish_reason"] in ("stop", "length") for c in data["choices"])
            usage = data["usage"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    check()
    assert seen.get(200, 0) >= 25, seen


# ---- the real default model --------------------------------------------------------------------------------------
@pytest.mark.integration
def test_real_model_chat_streaming(tmp_path):
    args = ("--kv-cache-memory", "256MiB", "--max-model-len", "2048")
    with ServerProcess(None, tmp_path / "server.log", *args) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert client.models.list().data[0].id == "smollm2-135m"
        stream = client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=40,
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert "Paris" in text, text
        r = client.completions.create(model="smollm2-135m", prompt="1, 2, 3, 4,", max_tokens=6, temperature=0)
        assert "5" in r.choices[0].text, r.choices[0].text
    assert "smollm2-135m" in srv.log() and "KV cache" in srv.log()
