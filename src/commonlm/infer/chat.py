"""A conversation in a fixed context: the prompt ids for the next reply, oldest turns dropped when they no
longer fit. Shared by `commonlm chat` and `LanguageModel.chat` (the server refuses instead, as OpenAI does,
and its web page drops turns itself).
"""

from __future__ import annotations

from dataclasses import dataclass

from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError


@dataclass
class ChatPrompt:
    ids: list[int]  # the conversation so far, ready for the reply (see Tokenizer.encode_chat)
    max_tokens: int  # what the reply may take: the asked-for length, or less where the context ends
    dropped: int  # oldest messages left out to make room


def fit_conversation(tokenizer: Tokenizer, messages: list[dict[str, str]], context: int,
                     max_tokens: int) -> ChatPrompt:
    """Drop the oldest turns (a system prompt stays) until the prompt leaves the reply `max_tokens`, or at
    least half the context when `max_tokens` asks for more than that; the newest message always stays."""
    keep_for_reply = max(1, min(max_tokens, context // 2))
    system = messages[:1] if messages and messages[0].get("role") == "system" else []
    turns = messages[len(system):]
    dropped = 0
    while True:
        ids = tokenizer.encode_chat(system + turns, add_generation_prompt=True)
        if len(ids) + keep_for_reply <= context or len(turns) <= 1:
            break
        turns = turns[1:]
        dropped += 1
        while len(turns) > 1 and turns[0].get("role") != "user":  # a conversation resumes with a user turn
            turns = turns[1:]
            dropped += 1
    if len(ids) >= context:
        raise UserError(f"the conversation needs {len(ids)} tokens even with only the newest message, and this "
                        f"model's context is {context}: send a shorter message (or a shorter system prompt)")
    return ChatPrompt(ids, min(max_tokens, context - len(ids)), dropped)
