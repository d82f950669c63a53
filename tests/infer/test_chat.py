"""Conversations in a fixed context (infer/chat.py and LanguageModel.chat): the oldest turns go first, the
system prompt and the newest message stay, and a message that cannot fit is a clear error."""

import pytest

from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.infer.chat import fit_conversation
from commonlm.infer.generate import SamplingParams, generate_text
from tests.serve.conftest import tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def turns(n: int, size: int = 40) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i:02d}" + "x" * (size - 2)}
            for i in range(n)]


def test_short_conversations_are_kept_whole():
    tok = Tokenizer.byte_level()
    messages = [{"role": "system", "content": "be brief"}] + turns(3)
    fitted = fit_conversation(tok, messages, context=1024, max_tokens=100)
    assert fitted.ids == tok.encode_chat(messages) and fitted.dropped == 0 and fitted.max_tokens == 100


def test_oldest_turns_go_first_and_the_system_prompt_stays():
    tok = Tokenizer.byte_level()
    messages = [{"role": "system", "content": "be brief"}] + turns(9)  # 9 turns of ~55 tokens each
    fitted = fit_conversation(tok, messages, context=256, max_tokens=64)
    kept = messages[:1] + messages[1 + fitted.dropped:]
    assert fitted.ids == tok.encode_chat(kept)
    assert kept[1]["role"] == "user" and kept[-1] == messages[-1]  # resumes on a user turn; newest stays
    assert len(fitted.ids) + 64 <= 256 < len(tok.encode_chat(messages[:1] + messages[fitted.dropped:])) + 64
    assert fitted.max_tokens == 64


def test_a_reply_asking_for_the_whole_context_still_gets_half_of_it():
    tok = Tokenizer.byte_level()
    fitted = fit_conversation(tok, turns(9), context=256, max_tokens=1000)
    assert len(fitted.ids) <= 128 and fitted.max_tokens == 256 - len(fitted.ids)


def test_a_newest_message_longer_than_the_context_is_a_clear_error():
    with pytest.raises(UserError, match="context is 256"):
        fit_conversation(Tokenizer.byte_level(), turns(3) + [{"role": "user", "content": "y" * 300}], 256, 10)


def test_language_model_chat_answers_from_the_fitted_conversation():
    lm = tiny_lm()  # context 256
    messages = turns(9)
    fitted = fit_conversation(lm.tokenizer, messages, 256, 20)
    want = generate_text(lm.model, lm.tokenizer, fitted.ids, SamplingParams(max_tokens=20, temperature=0))
    assert lm.chat(messages, max_tokens=20, temperature=0) == want
