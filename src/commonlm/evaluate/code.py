"""HumanEval-style checking: EXECUTES MODEL-WRITTEN CODE. Only with a time limit, and only when asked.

A code task's answer is right when the prompt + the model's completion + the task's unit tests run to the end
without an error. That means running a program a model wrote, which may do anything your user account can:
so it runs in a separate Python process (isolated mode, an empty temporary working directory, a minimal
environment), in its own session so a hard time limit kills it and every process it started, with limits on
memory and CPU time, and without network where this machine allows a network namespace (`unshare -rn` or
`unshare -n`; where neither works, it says so once and runs with the network). This is not a sandbox against
a determined attacker: evaluate code tasks only on models you trust, or inside a container.

`commonlm eval MODEL --task humaneval --code-timeout 10` (the timeout, in seconds per problem, is required;
without it the task refuses to run).
"""

from __future__ import annotations

import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from commonlm.errors import UserError

MEMORY_LIMIT = 2 << 30  # bytes of address space for the program
_network_off: list[str] | None = None  # the unshare command that works here ([] where none does)


def check_timeout(timeout_s: float | None) -> float:
    """The time limit, or UserError: model-written code never runs without one."""
    if timeout_s is None or isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) \
            or not math.isfinite(timeout_s) or timeout_s <= 0:
        raise UserError("code tasks execute model-written code: they run only with a time limit; pass "
                        "--code-timeout SECONDS (e.g. 10), and only for models you trust (see evaluate/code.py)")
    return float(timeout_s)


def no_network_prefix() -> list[str]:
    """`unshare -rn` or `unshare -n` where one of them works on this machine, else [] (said once)."""
    global _network_off
    if _network_off is None:
        _network_off = []
        for command in (["unshare", "-rn"], ["unshare", "-n"]):
            try:
                if subprocess.run([*command, "true"], capture_output=True, timeout=10).returncode == 0:
                    _network_off = command
                    break
            except (OSError, subprocess.TimeoutExpired):
                continue
        if not _network_off:
            print("note: no network namespace here (unshare -rn / -n failed): model-written code runs WITH network "
                  "access", file=sys.stderr)
    return _network_off


def _limits(timeout_s: float):
    def apply() -> None:  # in the child, before the program starts
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        cpu = int(math.ceil(timeout_s)) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_program(source: str, timeout_s: float) -> tuple[bool, str]:
    """(passed, why) for running `source` as a Python program under the limits above."""
    timeout_s = check_timeout(timeout_s)
    with tempfile.TemporaryDirectory(prefix="commonlm-code-") as work:
        program = Path(work) / "program.py"
        program.write_text(source, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        command = [*no_network_prefix(), sys.executable, "-I", str(program)]
        proc = subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_limits(timeout_s))
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the program and anything it started
            proc.communicate()
            return False, f"timed out after {timeout_s:g} s"
    if proc.returncode == 0:
        return True, "passed"
    lines = err.decode("utf-8", "replace").strip().splitlines()
    return False, lines[-1] if lines else f"exit status {proc.returncode}"


def humaneval_check(timeout_s: float):
    """A checker (completion, tests, prompt) -> 1.0 when prompt + completion passes the tests, else 0.0."""
    timeout_s = check_timeout(timeout_s)

    def check(completion: str, tests: str, prompt: str = "") -> float:
        return float(run_program(prompt + completion + "\n" + tests, timeout_s)[0])
    return check
