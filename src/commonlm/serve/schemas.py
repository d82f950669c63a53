"""Request bodies of the OpenAI API subset we serve, validated by pydantic (bad values are 400s).

Unknown fields are accepted and ignored, as OpenAI clients send many (user, metadata, ...); fields of the
API that we do not implement (logprobs, tools, response_format, ...) are refused when they ask for
something, rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _encodable(text: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"), which are no text at all: refuse them (400) here rather
    than fail in the tokenizer (500)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"is not valid Unicode (a lone surrogate at character {e.start})") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]

# OpenAI fields we do not implement, with the values that ask for nothing (what clients send by default)
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "logit_bias": (None, {}), "best_of": (None, 1),
    "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "response_format": (None, {"type": "text"}), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,),
}


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # not in OpenAI's API; vLLM-style extension
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(default=1, ge=1, le=1)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=10.0)  # extension, as in vLLM / HF

    def refusal(self) -> tuple[str, str] | None:
        """(param, message) when the request asks for something this server does not do, else None."""
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
                return name, f"'{name}' is not supported by this server; leave it out"
        if isinstance(self.stop, list) and len(self.stop) > 4:
            return "stop", f"'stop' takes at most 4 sequences, not {len(self.stop)}"
        return None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]


class CompletionRequest(Sampling):
    prompt: Text | list[int] | list[Text]
    echo: bool = False
    # extension: read '<|endoftext|>' and the like in the prompt as control tokens (default: plain text)
    allow_special_tokens: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]  # images and audio: this server has no such model
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
