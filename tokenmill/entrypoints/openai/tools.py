"""Tool calling on chat completions: how tools reach the prompt, how tool_choice constrains the reply, and how
the reply becomes OpenAI `tool_calls` (whole or as stream deltas).

Prompt: a chat template that knows tools (it mentions `tools`, as Qwen2.5's does) renders them itself; for
one that does not (the default SmolLM2's), the tool list is appended to the system message in the same
Hermes / Qwen2.5 format, and past tool calls and tool results are written into the conversation as that
format's `<tool_call>` / `<tool_response>` blocks, so the model sees one convention either way.

Reply: with tool_choice "auto" the model may answer in text or write `<tool_call>{"name": ..., "arguments":
...}</tool_call>` blocks, which are parsed out. With "required" the grammar forces a JSON array of calls
(each one a function of the list with arguments that validate against its parameters schema); with a named
function it forces that function's arguments object, so the arguments always parse.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from tokenmill.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatTool,
    DeltaFunctionCall,
    DeltaToolCall,
    NamedToolChoice,
)
from tokenmill.structured import StructuredOutputs

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_ANY_OBJECT: dict[str, Any] = {"type": "object"}

_SYSTEM_TOOLS = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def parameters_schema(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters or _ANY_OBJECT


def tool_choice_mode(req: ChatCompletionRequest) -> str:
    """'none' (no tools, or tool_choice none), 'auto', 'required' or 'named'."""
    if not req.tools or req.tool_choice == "none":
        return "none"
    if isinstance(req.tool_choice, NamedToolChoice):
        return "named"
    return req.tool_choice or "auto"


def named_tool(req: ChatCompletionRequest) -> ChatTool | None:
    """The tool a named tool_choice picks, or None if no tool of that name was given."""
    assert isinstance(req.tool_choice, NamedToolChoice)
    return next((t for t in req.tools or [] if t.function.name == req.tool_choice.function.name), None)


def tool_constraint(req: ChatCompletionRequest) -> StructuredOutputs | None:
    """The grammar that enforces tool_choice required / named (None for auto and none)."""
    mode = tool_choice_mode(req)
    if mode == "named":
        tool = named_tool(req)
        return StructuredOutputs(json=parameters_schema(tool)) if tool is not None else None
    if mode == "required":
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "arguments": parameters_schema(t)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in req.tools or []
        ]
        items = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return StructuredOutputs(json={"type": "array", "items": items, "minItems": 1})
    return None


def template_knows_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def render_messages(
    req: ChatCompletionRequest, messages: list[dict[str, Any]], knows_tools: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) for the chat template. `messages` are the request's, as role/content dicts plus
    `tool_calls` (OpenAI form) and `tool_call_id`."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    if tool_choice_mode(req) == "none":
        tools = None
    if knows_tools:  # the template writes tools, tool calls and tool results; arguments as dicts, as in HF
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [
                    {
                        "type": "function",
                        "id": c.get("id"),
                        "function": {
                            "name": c["function"]["name"],
                            "arguments": _loads(c["function"]["arguments"]),
                        },
                    }
                    for c in m["tool_calls"]
                ]
            out.append(m)
        return out, tools
    out: list[dict[str, Any]] = []
    last_was_tool = False
    for m in messages:
        if m["role"] == "tool":  # a tool result, written as the user turn Qwen2.5's template writes
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if last_was_tool:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            last_was_tool = True
            continue
        last_was_tool = False
        content = m["content"]
        for c in m.get("tool_calls") or []:
            call = {"name": c["function"]["name"], "arguments": _loads(c["function"]["arguments"])}
            block = f"{TOOL_CALL_OPEN}\n{json.dumps(call)}\n{TOOL_CALL_CLOSE}"
            content = f"{content}\n{block}" if content else block
        out.append({"role": m["role"], "content": content})
    if tools:
        text = _SYSTEM_TOOLS.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {
                "role": "system",
                "content": f"{out[0]['content']}\n\n{text}" if out[0]["content"] else text,
            }
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, None


def _loads(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except (json.JSONDecodeError, TypeError):
        return arguments


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=new_call_id)


def parse_reply(req: ChatCompletionRequest, text: str) -> tuple[str | None, list[ParsedCall]]:
    """(content, tool calls) of a finished reply under the request's tool_choice."""
    mode = tool_choice_mode(req)
    if mode == "named":
        tool = named_tool(req)
        return None, [ParsedCall(tool.function.name, text)] if tool else []
    if mode == "required":
        try:
            calls = json.loads(text)
        except json.JSONDecodeError:
            return text, []  # cut by max_tokens before the grammar finished
        return None, [ParsedCall(c["name"], json.dumps(c["arguments"])) for c in calls]
    if mode == "none" or TOOL_CALL_OPEN not in text:
        return text, []
    names = {t.function.name for t in req.tools or []}
    calls = []
    for body in _TOOL_CALL_RE.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and call.get("name") in names:
            args = call.get("arguments", call.get("parameters", {}))
            calls.append(ParsedCall(call["name"], args if isinstance(args, str) else json.dumps(args)))
    if not calls:
        return text, []
    content = text[: text.index(TOOL_CALL_OPEN)].strip()
    return content or None, calls


def held_back(text: str) -> int:
    """Auto mode, streaming: how many trailing characters of not-yet-sent text to hold, because they may
    still begin a `<tool_call>` block (a prefix of the tag) or precede one (whitespace, which the
    non-streaming parse strips from the content before a call)."""
    for n in range(min(len(text), len(TOOL_CALL_OPEN) - 1), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-n:]):
            break
    else:
        n = 0
    return len(text) - len(text[: len(text) - n].rstrip())


class ReplyStreamer:
    """One streamed choice of a request with tools: turns text deltas into content deltas or OpenAI
    tool-call deltas, so that the concatenated deltas equal the non-streaming reply. Named: the output is the
    arguments, streamed as they come (the first delta carries the call's id and name). Required: the JSON
    array is complete only at the end; its calls are sent then, one delta each. Auto: text streams as content
    except what may still begin a `<tool_call>` block (held_back); from the first `<tool_call>` on, the rest
    is held, and at the end its calls are sent (or, if no valid call parses, the held text as content)."""

    def __init__(self, req: ChatCompletionRequest):
        self.req = req
        self.mode = tool_choice_mode(req)
        self.text = ""
        self.sent = 0  # auto: characters of text already sent (or skipped) as content
        self.in_call = False  # auto: a `<tool_call>` tag has appeared at text[sent:]
        self.call_id = new_call_id()
        self.called = False

    def feed(self, delta: str, finished: bool) -> tuple[str, list[DeltaToolCall]]:
        """(content to send, tool-call deltas to send) for this delta."""
        self.text += delta
        if self.mode == "none":
            return delta, []
        if self.mode == "named":
            if not delta:
                return "", []
            if not self.called:
                self.called = True
                name = named_tool(self.req).function.name
                fn = DeltaFunctionCall(name=name, arguments=delta)
                return "", [DeltaToolCall(index=0, id=self.call_id, type="function", function=fn)]
            return "", [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=delta))]
        if self.mode == "auto":
            return self._feed_auto(finished)
        if not finished:  # required: one JSON array, parsed at the end
            return "", []
        return self._finish()

    def _feed_auto(self, finished: bool) -> tuple[str, list[DeltaToolCall]]:
        out = ""
        if not self.in_call:
            tag = self.text.find(TOOL_CALL_OPEN, self.sent)
            if tag >= 0:  # content ends here; the whitespace before the tag stays unsent (parse strips it)
                self.in_call = True
                out = self.text[self.sent : tag].rstrip()
            else:
                out = self.text[
                    self.sent : len(self.text) - (0 if finished else held_back(self.text[self.sent :]))
                ]
            self.sent += len(out)
        if not finished or not self.in_call:
            return out, []
        content, calls = self._finish()
        return out + content, calls

    def _finish(self) -> tuple[str, list[DeltaToolCall]]:
        """At the end: the calls of the whole reply as deltas, plus content not sent yet."""
        content, calls = parse_reply(self.req, self.text)
        unsent = self.text[self.sent :]
        if not calls:
            return unsent, []
        self.called = True
        deltas = [
            DeltaToolCall(
                index=i,
                id=c.id,
                type="function",
                function=DeltaFunctionCall(name=c.name, arguments=c.arguments),
            )
            for i, c in enumerate(calls)
        ]
        # required: content is None; auto: what precedes the first call was streamed already
        return (content or "") if self.mode != "auto" else "", deltas
