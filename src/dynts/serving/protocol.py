"""The request bodies of the OpenAI endpoints, checked field by field: every mistake is one APIError(400) naming the
field, fields that would change the answer and that we do not implement (logprobs, tools, penalties, ...) are
refused by name, and fields nobody needs to act on are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError

from dynts.serving.errors import APIError

Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, Strict()]  # an int is taken as a float; a string is not
MAX_N = 16  # choices per request: each is a sequence in the batch
MAX_STOP_STRINGS = 16

# Fields we do not implement, and the values that mean "not used" (anything else is refused by name).
UNSUPPORTED: dict[str, tuple] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "prompt_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "length_penalty": (None, 1, 1.0),
    "min_p": (None, 0, 0.0),
    "min_tokens": (None, 0),
    "best_of": (None, 1),
    "use_beam_search": (None, False),
    "echo": (None, False),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "logits_processors": (None, []),
    "prediction": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
}
# chat_template_kwargs that would break how the server renders the prompt.
RESERVED_TEMPLATE_KWARGS = {"conversation", "messages", "tokenize", "return_dict", "add_generation_prompt", "tools"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: Bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class CommonFields(BaseModel):
    """What chat and completions requests share; extra fields are kept only to check them against UNSUPPORTED."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: Int | None = Field(default=None, ge=1)
    temperature: Float | None = Field(default=None, ge=0)
    top_p: Float | None = Field(default=None, gt=0, le=1)
    top_k: Int | None = Field(default=None, ge=-1)
    seed: Int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] | None = None
    ignore_eos: Bool = False
    n: Int = Field(default=1, ge=1, le=MAX_N)
    stream: Bool = False
    stream_options: StreamOptions | None = None
    kv_budget: Int | None = Field(default=None, ge=1)
    return_token_ids: Bool = False  # vLLM's extension: prompt and generated token ids in the response


class ChatRequest(CommonFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(CommonFields):
    prompt: str | list[str] | list[Int] | list[list[Int]]


@dataclass(frozen=True)
class SamplingRequest:
    """The sampling asked for; None means the server's default (its flags)."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    n: int
    kv_budget: int | None


def parse_body(raw: bytes, model: type[CommonFields]) -> CommonFields:
    """Bytes of a request body -> a checked request, or one APIError(400) that says what is wrong and where."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    check_unsupported(request.model_extra or {})
    check_common(request)
    if isinstance(request, ChatRequest):
        check_chat(request)
    else:
        check_completion(request)
    return request


def validation_error(exc: ValidationError) -> APIError:
    """The first problem, named by its field path (pydantic's union-branch tags such as `str` dropped)."""
    errors = exc.errors(include_url=False)
    paths = [field_path(e["loc"]) for e in errors]
    first = paths[0]
    same = [e for e, path in zip(errors, paths) if path == first]  # one field, several accepted types
    what = " or ".join(dict.fromkeys(e["msg"] for e in same))
    got = f" (got {type(same[0]['input']).__name__})" if "input" in same[0] and len(same) > 1 else ""
    others = len(set(paths) - {first})
    more = f" (and {others} more field{'s' * (others > 1)})" if others else ""
    return APIError(400, f"{first or 'body'}: {what}{got}{more}", param=first or None)


def field_path(loc) -> str:
    parts = []
    for part in loc:
        if isinstance(part, str) and (part in UNION_TAGS or "[" in part or part[:1].isupper()):
            continue  # a union branch (str, list[int], TextPart ...), not a field
        parts.append(str(part))
    return ".".join(parts)


UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after", "literal", "none"}


def check_unsupported(extra: dict[str, Any]) -> None:
    used = [name for name, harmless in UNSUPPORTED.items() if name in extra and extra[name] not in harmless]
    if used:
        raise APIError(
            400,
            f"not supported by this server: {', '.join(used)} (remove {'them' if len(used) > 1 else 'it'})",
            param=used[0],
        )


def check_common(request: CommonFields) -> None:
    stops = stop_strings(request)
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "stop: a stop string must not be empty", param="stop")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")


def check_chat(request: ChatRequest) -> None:
    if request.max_tokens is not None and request.max_completion_tokens is not None:
        if request.max_tokens != request.max_completion_tokens:
            raise APIError(
                400,
                "max_tokens and max_completion_tokens disagree: send one of them",
                param="max_completion_tokens",
            )
    for i, message in enumerate(request.messages):
        if message.content is None:
            raise APIError(400, f"messages.{i}.content is missing", param=f"messages.{i}.content")
        if "tool_calls" in (message.model_extra or {}) and message.model_extra["tool_calls"]:
            raise APIError(400, "not supported by this server: tool_calls", param=f"messages.{i}.tool_calls")
    if request.messages[-1].role == "assistant":
        raise APIError(
            400, "the last message must not be the assistant's (continuing it is not supported)", param="messages"
        )
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(request.chat_template_kwargs or {}))
    if reserved:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")


def check_completion(request: CompletionRequest) -> None:
    prompts = completion_prompts(request) if request.prompt != [] else []
    if not prompts or any(len(p) == 0 for p in prompts):
        raise APIError(400, "prompt must not be empty", param="prompt")


def stop_strings(request: CommonFields) -> tuple[str, ...]:
    if request.stop is None:
        return ()
    return (request.stop,) if isinstance(request.stop, str) else tuple(request.stop)


def sampling_of(request: CommonFields) -> SamplingRequest:
    max_tokens = request.max_tokens
    if isinstance(request, ChatRequest) and request.max_completion_tokens is not None:
        max_tokens = request.max_completion_tokens
    return SamplingRequest(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        seed=request.seed,
        stop=stop_strings(request),
        stop_token_ids=tuple(request.stop_token_ids or ()),
        ignore_eos=request.ignore_eos,
        n=request.n,
        kv_budget=request.kv_budget,
    )


def completion_prompts(request: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completions request: one string, several, one token list, or several."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [p if isinstance(p, str) else list(p) for p in prompt]


def include_usage(request: CommonFields) -> bool:
    return bool(request.stream_options and request.stream_options.include_usage)
