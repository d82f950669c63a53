"""The one exception type users see.

Anything a user can cause (a missing file, a bad setting, a corrupt checkpoint) raises `UserError`
with a message that says what is wrong and how to fix it. The CLI prints it on one line and exits
non-zero; any other exception is a bug in CommonLM and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def already_exists(verb: str, path: object) -> UserError:
    """The one wording for an output that would replace something (every such verb has --overwrite)."""
    return UserError(f"{verb}: {path} already exists; pass --overwrite to replace it, or choose another --out")
