"""Preference pairs for DPO (tune/dpo.py): jsonl lines `{"prompt": str | "messages": [...], "chosen": str,
"rejected": str}`, the prompt a user turn (or the messages the conversation so far) and chosen/rejected two
replies of the assistant to it. `commonlm data prepare --format preference` renders each pair as two chat
conversations with data/chat.py (`prepare_chat(..., preference=True)`), only the reply carrying loss.
"""

from __future__ import annotations

from collections.abc import Iterator

from commonlm.data.chat import _conversation, read_records
from commonlm.errors import UserError


def read_pairs(inputs: list[str]) -> Iterator[tuple[str, list[list[dict[str, str]]]]]:
    """('file:line', [prompt + chosen, prompt + rejected]) for every non-blank line of the jsonl inputs."""
    for where, record in read_records(inputs, "preference"):
        if not isinstance(record, dict) or not ("prompt" in record or "messages" in record):
            raise UserError(f"preference data: {where}: expected a JSON object with 'prompt' (or 'messages'), "
                            "'chosen' and 'rejected'")
        replies = [record.get("chosen"), record.get("rejected")]
        for name, reply in zip(("chosen", "rejected"), replies):
            if not isinstance(reply, str) or not reply.strip():
                raise UserError(f"preference data: {where}: '{name}' must be a non-empty string")
        if replies[0] == replies[1]:
            raise UserError(f"preference data: {where}: 'chosen' and 'rejected' are the same reply (nothing to prefer)")
        if "messages" in record:
            prompt = record["messages"]
            if not isinstance(prompt, list) or not prompt:
                raise UserError(f"preference data: {where}: 'messages' must be a non-empty list of {{role, content}}")
        else:
            prompt = [{"role": "user", "content": record["prompt"]}]
        if isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
            raise UserError(f"preference data: {where}: the conversation so far ends with an assistant turn; "
                            "the chosen and rejected replies are the assistant's next turn")
        yield where, [_conversation({"messages": [*prompt, {"role": "assistant", "content": r}]}, where)
                      for r in replies]
