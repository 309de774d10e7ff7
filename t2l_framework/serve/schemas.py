"""Request bodies of the HTTP API (OpenAI's chat shape plus T2L's ``description``) and limits."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_DESCRIPTION_CHARS = 2000
MAX_TOKENS = 512
MAX_PROMPT_CHARS = 16000  # all messages together; the token check against the context comes later
MAX_MESSAGES = 256  # a conversation longer than this does not fit a context anyway
MAX_PARTS = 64  # text parts of one message
INVALID_UNICODE = "invalid_unicode"  # error type the app answers with 400, like malformed JSON


def _unicode(value: str) -> str:
    """JSON may spell lone surrogates (``"\\udfff"``); they are not text and no tokenizer takes them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(INVALID_UNICODE, "not valid Unicode text: {reason} at position {pos}",
                                  {"reason": exc.reason, "pos": exc.start}) from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]


def _description(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("description must not be empty")
    return value.strip() if value is not None else None


class AdapterRequest(BaseModel):
    """POST /v1/adapters."""

    description: Text = Field(min_length=1, max_length=MAX_DESCRIPTION_CHARS,
                              description="Plain-language description of the task")

    _strip = field_validator("description")(_description)


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: Text


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_PARTS)]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    """POST /v1/chat/completions: OpenAI's fields that matter here (others are ignored)."""

    model: Text = Field("t2l", max_length=200, description="'base', 't2l:<adapter id>', or 't2l' with a description")
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    stream: bool = False
    description: Text | None = Field(None, min_length=1, max_length=MAX_DESCRIPTION_CHARS,
                                     description="T2L extension: generate (or reuse) the adapter for this task")

    _strip = field_validator("description")(_description)

    @model_validator(mode="after")
    def _check_messages(self) -> "ChatRequest":
        if self.messages[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        if sum(len(m.text()) for m in self.messages) > MAX_PROMPT_CHARS:
            raise ValueError(f"messages are longer than {MAX_PROMPT_CHARS} characters in all")
        return self

    def chat_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]
