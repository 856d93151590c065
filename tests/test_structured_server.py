"""Structured output and tools through the official `openai` client against `tokenmill serve` (tiny random
model: whatever it writes, the constraint holds): response_format, guided_* extra fields, tool_choice
required / named / auto, streaming and not, the tool-call round trip, logit_bias, prompt logprobs, and 400s
naming the field for invalid schemas, regexes, grammars and tool definitions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.test_server import ServerProcess, assert_error
from tokenmill.entrypoints.openai import tools as tool_helpers
from tokenmill.entrypoints.openai.protocol import ChatCompletionRequest

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    args = ("--kv-cache-memory", "16MiB", "--max-model-len", "512")
    with ServerProcess(str(tiny_model_dir), tmp_path_factory.mktemp("srv") / "server.log", *args) as srv:
        yield srv
        assert srv.proc.poll() is None, f"server died:\n{srv.log()[-5000:]}"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return Path(tiny_model_dir).name


def chat(client, model, stream=False, **kw):
    kw.setdefault("messages", USER)
    kw.setdefault("max_tokens", 48)
    reply = client.chat.completions.create(model=model, stream=stream, **kw)
    if not stream:
        return reply.choices[0]
    content, calls, finish = "", {}, None
    for chunk in reply:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_and_object(client, model, stream):
    schema_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
    }
    got = chat(client, model, stream, response_format=schema_format, temperature=0.8, seed=int(stream))
    text = got[0] if stream else got.message.content
    jsonschema.validate(json.loads(text), SCHEMA)
    got = chat(client, model, stream, response_format={"type": "json_object"}, temperature=0, max_tokens=64)
    text = got[0] if stream else got.message.content
    assert text.startswith("{")  # a random model may write one endless key; the real-model test parses


@pytest.mark.parametrize("stream", [False, True])
def test_guided_fields_on_both_endpoints(client, model, stream):
    def completion(extra, **kw):
        kw.setdefault("max_tokens", 24)
        reply = client.completions.create(
            model=model, prompt="Answer:", stream=stream, extra_body=extra, **kw
        )
        return "".join(c.choices[0].text for c in reply) if stream else reply.choices[0].text

    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", completion({"guided_regex": "[0-9]{3}-[a-z]{2}"}))
    assert completion({"guided_choice": ["alpha", "beta"]}) in ("alpha", "beta")
    assert re.fullmatch(r"a[bc]{1,3}d", completion({"guided_grammar": 'root ::= "a" [b-c]{1,3} "d"'}))
    assert re.fullmatch(r"\((x|y)\)", completion({"guided_grammar": 'start: "(" ("x" | "y") ")"'}))
    jsonschema.validate(json.loads(completion({"guided_json": SCHEMA}, max_tokens=40)), SCHEMA)
    got = chat(client, model, stream, extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(got[0] if stream else got.message.content), SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
def test_named_and_required_tool_calls_validate(client, model, stream):
    named = {"type": "function", "function": {"name": "get_weather"}}
    got = chat(client, model, stream, tools=[WEATHER, TIME], tool_choice=named, temperature=0.7, seed=3)
    calls = (
        got[1]
        if stream
        else [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in got.message.tool_calls
        ]
    )
    finish = got[2] if stream else got.finish_reason
    assert finish == "tool_calls" and len(calls) == 1 and calls[0]["id"].startswith("call_")
    assert calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])

    got = chat(client, model, stream, tools=[WEATHER, TIME], tool_choice="required", max_tokens=64)
    calls = (
        got[1]
        if stream
        else [{"name": c.function.name, "arguments": c.function.arguments} for c in got.message.tool_calls]
    )
    assert calls and (got[2] if stream else got.finish_reason) == "tool_calls"
    by_name = {"get_weather": WEATHER, "get_time": TIME}
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), by_name[call["name"]]["function"]["parameters"])


def test_tool_call_round_trip(client, model):
    first_reply = client.chat.completions.create(
        model=model, messages=USER, tools=[WEATHER], tool_choice="required", max_tokens=48
    )
    first, first_prompt_tokens = first_reply.choices[0], first_reply.usage.prompt_tokens
    call = first.message.tool_calls[0]
    result = {
        "role": "tool",
        "tool_call_id": call.id,
        "content": json.dumps({"forecast": "sunny", "celsius": 21}),
    }
    messages = [*USER, first.message, result]  # the client's own message object, as OpenAI's docs do
    reply = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER], max_tokens=8, temperature=0
    )
    answer = reply.choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls")
    assert answer.message.content or answer.message.tool_calls
    # the call and the tool's result are in the prompt (Hermes blocks: the default template has no tools)
    called = json.dumps({"name": call.function.name, "arguments": json.loads(call.function.arguments)})
    result = json.dumps({"forecast": "sunny", "celsius": 21})
    assert reply.usage.prompt_tokens > first_prompt_tokens + len(called) // 8 + len(result) // 8


def test_auto_tool_choice_parses_tool_call_blocks():
    req = ChatCompletionRequest.model_validate({"messages": USER, "tools": [WEATHER]})
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}\n</tool_call>'
    content, calls = tool_helpers.parse_reply(req, text)
    assert content == "Let me check." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Rome", "days": 2})
    ]
    assert tool_helpers.parse_reply(req, "Just text.") == ("Just text.", [])
    streamer = tool_helpers.ReplyStreamer(req)
    pieces = [
        "<tool",
        "_call>\n",
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}',
        "\n</tool_call>",
    ]
    outs = [streamer.feed(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
    assert all(o == ("", []) for o in outs[:-1]) and outs[-1][1][0].function.name == "get_weather"
    plain = tool_helpers.ReplyStreamer(req)
    assert plain.feed("Hello", False) == ("Hello", [])


def stream_pieces(req, pieces):
    streamer = tool_helpers.ReplyStreamer(req)
    outs = [streamer.feed(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
    return "".join(o[0] for o in outs), [c for o in outs for c in o[1]], outs


@pytest.mark.parametrize(
    "pieces",
    [
        [
            "Let me ",
            "check",
            ".",
            "\n<",
            "tool",
            "_call>\n",
            '{"name": "get_weather", ',
            '"arguments": {"city": "Rome"}}',
            "\n</tool_call>",
        ],
        [
            "Sure.",
            " <tool_call>",
            '{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
            " bye",
        ],
        [
            "I think <to",
            "ols are fun",
            " and <tool",
            "box> too.",
            "\n",
        ],  # tag prefixes that never become a tag
        ["<tool_call>{not json}</tool_call>"],
        ["  ", "Plain", " text ", " ", "end"],
    ],
)
def test_auto_streaming_matches_the_non_streaming_parse(pieces):
    """Content streams as it comes, calls after leading text arrive at the end, and the deltas add up to
    what the non-streaming reply holds."""
    req = ChatCompletionRequest.model_validate({"messages": USER, "tools": [WEATHER]})
    content, calls = tool_helpers.parse_reply(req, "".join(pieces))
    streamed, deltas, outs = stream_pieces(req, pieces)
    assert streamed == (content or "")
    assert [(d.function.name, d.function.arguments) for d in deltas] == [(c.name, c.arguments) for c in calls]
    if calls:  # the leading text was sent before the reply ended, not held to the end
        assert outs[0][0] and not outs[-1][0]
    elif len(pieces) > 1:  # plain text streams before the end
        held = "".join(o[0] for o in outs[:-1])
        assert "".join(pieces).startswith(held) and len(held) > 0


def test_tools_render_in_the_prompt_without_template_support():
    req = ChatCompletionRequest.model_validate({"messages": USER, "tools": [WEATHER]})
    messages = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome", "days": 1}'},
                }
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    out, tools = tool_helpers.render_messages(req, messages, knows_tools=False)
    assert tools is None and out[0]["role"] == "system" and '"get_weather"' in out[0]["content"]
    assert (
        out[2]["content"]
        == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}\n</tool_call>'
    )
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    out, tools = tool_helpers.render_messages(req, messages, knows_tools=True)  # e.g. Qwen2.5's template
    assert tools[0]["function"]["name"] == "get_weather"
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome", "days": 1}


def test_logit_bias_through_the_client(client, model, real_tokenizer):
    token = real_tokenizer.encode(" banana", add_special_tokens=False)[0]
    reply = client.completions.create(
        model=model, prompt="x", max_tokens=4, temperature=0, logit_bias={str(token): 100}
    )
    assert reply.choices[0].text == " banana" * 4


BAD = [
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "bogus"}},
            }
        },
        "response_format",
    ),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_regex": "(["}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_grammar": "start: missing_rule"}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "zzz"}}}]},
        "tools.0.function.parameters",
    ),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 1000}}, "logit_bias"),
]


@pytest.mark.parametrize("extra, param", BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_invalid_constraints_are_400_naming_the_field(server, extra, param):
    r = httpx.post(
        server.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 4, **extra}, timeout=60
    )
    err = assert_error(r, 400)
    assert err["param"] is not None and err["param"].startswith(param), err


def test_echo_logprobs_and_prompt_logprobs(client, model, server):
    reply = client.completions.create(
        model=model, prompt="one two three four", max_tokens=2, echo=True, logprobs=2
    )
    lp = reply.choices[0].logprobs
    n_prompt = reply.usage.prompt_tokens
    assert lp.token_logprobs[0] is None and all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert len(lp.tokens) == n_prompt + 2 and all(len(t) >= 2 for t in lp.top_logprobs[1:])
    body = {"prompt": "one two three four", "max_tokens": 1, "prompt_logprobs": 1}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    entries = r["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == r["usage"]["prompt_tokens"]
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "one two three four"}).json()["tokens"]
    assert all(
        abs(entries[i][str(t)]["logprob"] - lp.token_logprobs[i]) < 1e-3 for i, t in enumerate(ids) if i
    )
    chat_body = {"messages": USER, "max_tokens": 1, "prompt_logprobs": 0}
    r = httpx.post(server.url + "/v1/chat/completions", json=chat_body, timeout=60).json()
    assert r["prompt_logprobs"][0] is None and len(r["prompt_logprobs"]) == r["usage"]["prompt_tokens"]
    models = httpx.get(server.url + "/v1/models").json()
    assert models["data"][0]["max_model_len"] == 512
    ok = client.chat.completions.create(
        model=model,
        messages=USER,
        max_tokens=2,
        user="u1",
        metadata={"k": "v"},
        extra_body={"stop_token_ids": [0]},
    )
    assert ok.choices[0].finish_reason in ("stop", "length")
