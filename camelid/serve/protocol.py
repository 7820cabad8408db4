"""The request bodies the server accepts, as pydantic models (a subset of OpenAI's API).

Ranges follow OpenAI's documentation, so a request that OpenAI would refuse is refused here too,
with the field named. Fields we do not implement but that change nothing when left at their
defaults (user, ...) are ignored; one that would silently change the meaning of the answer
(a completion's suffix) is refused instead.

Text that is not valid Unicode is not an error (the project's rule for all text): JSON may
carry lone surrogates ("\\ud800"), which no tokenizer or UTF-8 encoder takes, so every string
in a request becomes valid text (camelid/tokenizer/text.py: lone surrogates become U+FFFD)
before the fields are read.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from camelid.tokenizer.text import replace_invalid

TEXT_DEPTH = 6  # the deepest string a request holds: body.messages[i].content[j].text, and a margin


def valid_text(value: Any, depth: int = TEXT_DEPTH) -> Any:
    """`value` (parsed JSON) with each lone surrogate in its strings, keys too, replaced by
    U+FFFD. Deeper than `depth` nothing is a string field, and the fields' own checks refuse
    what is there, so the walk stops: a hostile nesting cannot exhaust the stack."""
    if isinstance(value, str):
        return replace_invalid(value)
    if depth <= 0:
        return value
    if isinstance(value, list):
        return [valid_text(v, depth - 1) for v in value]
    if isinstance(value, dict):
        return {valid_text(k, 0): valid_text(v, depth - 1) for k, v in value.items()}
    return value


class _Request(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        return valid_text(data)


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchema(_Request):
    name: str = Field("response", max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")   # None: any JSON object
    strict: bool | None = None   # the output always follows the schema, strict or not


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a "json_schema" object: {"name": ..., "schema": {...}}')
        return self

    @property
    def constrained(self) -> bool:
        return self.type != "text"

    @property
    def schema(self) -> dict[str, Any] | None:
        """The schema the output must follow; None for any JSON object."""
        return self.json_schema.schema_ if self.type == "json_schema" and self.json_schema else None


MAX_TOP_LOGPROBS = 20   # OpenAI's limit for chat, and vLLM's default


class SamplingFields(_Request):
    """What completions and chat completions share."""

    model: str | None = None  # None: the one model this server has
    max_tokens: int | None = Field(None, ge=0)   # 0: only with a completion's echo (the prompt's log-probabilities)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=128)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[int, float] | None = None   # token id (a JSON key, so a string) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_texts(cls, stop):
        if stop is None or isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            return stop
        raise ValueError("expected a string or a list of strings")

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, bias):
        for token, value in (bias or {}).items():
            if not -100 <= value <= 100:
                raise ValueError(f"token {token}: a bias must be in [-100, 100] (got {value})")
        return bias

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _token_list(value) -> bool:
    return isinstance(value, list) and all(type(p) is int for p in value)


class CompletionRequest(SamplingFields):
    # text or token ids, or a list of either: several prompts, each its own choices (OpenAI's batch form)
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)   # the sampled token's, and this many more
    echo: bool = False   # the prompt before the completion (with its log-probabilities, given logprobs)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt):
        # checked up front: pydantic's own message would list each alternative's failure
        if isinstance(prompt, str) or _token_list(prompt) or (isinstance(prompt, list) and prompt and (
                all(isinstance(p, str) for p in prompt) or all(_token_list(p) for p in prompt))):
            return prompt
        raise ValueError("expected a string, a list of token ids, or a list of several of either")

    @field_validator("suffix")
    @classmethod
    def _unsupported(cls, value):
        if value is not None:
            raise ValueError("not supported by this server; leave it out")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, one or several."""
        if isinstance(self.prompt, str) or _token_list(self.prompt):
            return [self.prompt]
        return list(self.prompt)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, content):
        # checked up front: pydantic's own message names only the first alternative ("content.str")
        if content is None or isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ValueError("expected a string, null, or a list of text parts")
        for i, part in enumerate(content):
            if not isinstance(part, dict):
                raise ValueError(f'part {i}: expected an object {{"type": "text", "text": "..."}}')
            if part.get("type") != "text":
                raise ValueError(f"part {i}: only text parts are supported (got type {part.get('type')!r})")
            if not isinstance(part.get("text"), str):
                raise ValueError(f'part {i}: "text" must be a string')
        return content

    def as_template_input(self) -> dict[str, str]:
        """The {"role", "content"} form the chat templates take: text parts joined, and
        OpenAI's newer "developer" role written as the "system" role the templates know."""
        content = self.content if isinstance(self.content, str) else \
            "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a completion's prompt, or a conversation rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True   # a prompt: the beginning-of-text token where the model adds one

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either 'prompt' (text) or 'messages' (a conversation), not both or neither")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]
