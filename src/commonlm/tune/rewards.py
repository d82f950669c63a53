"""Rewards for RL with verifiable rewards (tune/grpo.py): a function of one completion that says how good it is.

    reward(completion: str, answer: str, prompt: str) -> float

`completion` is the sampled reply's text (without the end-of-turn token), `answer` the prompt's answer from
the data (`commonlm data prepare --format prompts`), `prompt` the text of the prompt's last user message.
`train.reward` (`tune grpo --reward`) names one:

    gsm8k              1.0 when the completion's final number equals the answer's (GSM8K style: an answer
                       "... #### 72" counts its number after ####; "1,000" and "$5" are numbers), else 0.0
    exact              1.0 when the completion equals the answer, surrounding whitespace aside, else 0.0
    FILE.py:FUNCTION   your own Python function with that signature. It is imported and run in this process,
                       with the run's permissions: it is your code, so run only code you trust.

A reward that raises (or returns something that is not a finite number) scores 0.0 for that completion; the
run goes on and prints one line naming the prompt and the error, once per distinct error (its type and the
line that raised it: an error whose message holds the completion is still shown once).
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from commonlm.errors import UserError
from commonlm.utils import console

Reward = Callable[[str, str, str], float]
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The last number in `text` (after '####' when it has one, as GSM8K's answers do), or None."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").replace("$", ""))
    except ValueError:
        return None


def gsm8k(completion: str, answer: str, prompt: str = "") -> float:
    """1.0 when the completion's final number equals the answer's final number."""
    want, got = final_number(answer), final_number(completion)
    return float(want is not None and got is not None and math.isclose(want, got, rel_tol=0, abs_tol=1e-9))


def exact(completion: str, answer: str, prompt: str = "") -> float:
    """1.0 when the completion is the answer, leading and trailing whitespace aside."""
    return float(completion.strip() == answer.strip())


BUILTIN: dict[str, Reward] = {"gsm8k": gsm8k, "exact": exact}
HOW = "use gsm8k, exact or FILE.py:FUNCTION"


def _split(spec: str) -> tuple[Path, str]:
    """FILE.py:FUNCTION -> (file, function), checked before anything runs."""
    path, _, name = spec.rpartition(":")
    if not path or not name.isidentifier():
        raise UserError(f"reward {spec!r}: not a checker name; {HOW} (a function in your own Python file)")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"reward {spec!r}: no file {file}; {HOW}")
    return file, name


def check_reward(spec: str) -> None:
    """UserError unless `spec` names a built-in checker or an existing FILE.py:FUNCTION (not imported here)."""
    if spec not in BUILTIN:
        _split(spec)


def load_reward(spec: str) -> Reward:
    """The reward `spec` names; a user's file is imported (its top level runs) and must define the function."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    file, name = _split(spec)
    module_name = f"commonlm_user_reward_{abs(hash(str(file.resolve())))}"
    try:
        loader = importlib.util.spec_from_file_location(module_name, file)
        if loader is None or loader.loader is None:
            raise ImportError("not a Python source file")
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module  # (dataclasses and pickling look modules up there)
        loader.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(module_name, None)
        raise UserError(f"reward {spec!r}: importing {file} failed ({type(e).__name__}: {e})") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"reward {spec!r}: {file} defines no function {name!r}; define "
                        f"`def {name}(completion: str, answer: str, prompt: str) -> float`")
    return fn


class Scorer:
    """Calls a reward on completions; a raising reward scores 0.0 and is reported once per distinct error."""

    def __init__(self, reward: Reward, show: bool = True):
        self.reward, self.show = reward, show
        self.seen: set[tuple[str, str, int | None]] = set()

    def __call__(self, completion: str, answer: str, prompt: str) -> float:
        try:
            value = self.reward(completion, answer, prompt)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"returned {value!r}, not a finite number")
            return float(value)
        except Exception as e:
            where = traceback.extract_tb(e.__traceback__)[-1]
            key = (type(e).__name__, where.filename, where.lineno)
            if key not in self.seen:
                self.seen.add(key)
                if self.show:
                    console.print(f"reward: {type(e).__name__}: {e} (prompt {prompt[:80]!r}, completion "
                                  f"{completion[:40]!r}); scored 0.0, the run goes on; this error is not shown "
                                  "again", style="yellow", soft_wrap=True, markup=False)
            return 0.0
