"""The HumanEval checker executes model-written code: only with a time limit, in a subprocess it kills whole."""

import gzip
import json
import socket
import time
from pathlib import Path

import pytest
import yaml

from commonlm.cli import main
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.evaluate.code import no_network_prefix, run_program
from commonlm.evaluate.scoring import score_task
from commonlm.evaluate.tasks import load_task_file
from tests.evaluate.conftest import bigram_model, save_bigram, table


@pytest.mark.parametrize("timeout", [None, 0, -1, float("inf"), float("nan")])
def test_refuses_to_run_without_a_time_limit(timeout):
    with pytest.raises(UserError, match="only with a time limit.*--code-timeout"):
        run_program("print('hi')", timeout)


def test_passing_and_failing_programs():
    assert run_program("assert 1 + 1 == 2\n", 20) == (True, "passed")
    passed, why = run_program("assert 1 + 1 == 3\n", 20)
    assert not passed and why == "AssertionError"


def _running(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()  # a zombie has stopped running
    except FileNotFoundError:
        return False


def test_a_looping_sample_is_killed_with_what_it_started(tmp_path):
    pid_file = tmp_path / "child.pid"
    source = ("import subprocess, sys\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
              "while True:\n    pass\n")
    started = time.perf_counter()
    passed, why = run_program(source, 2)
    assert not passed and why == "timed out after 2 s" and time.perf_counter() - started < 15
    child = int(pid_file.read_text())
    deadline = time.time() + 5
    while _running(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _running(child)


def test_no_network_where_a_namespace_is_available():
    if not no_network_prefix():
        pytest.skip("no network namespace on this machine (unshare -rn / -n fail): the checker says so and runs")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        source = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
        passed, why = run_program(source, 20)
        assert not passed and ("Connection refused" in why or "unreachable" in why.lower()), why
    finally:
        server.close()


def humaneval_file(path: Path) -> Path:
    problems = [{"task_id": f"T/{i}", "prompt": f"def f{i}():\n    return", "entry_point": f"f{i}",
                 "canonical_solution": " 1\n", "test": f"def check(candidate):\n    assert candidate() == {want}\n"}
                for i, want in enumerate([1, 2])]
    path.write_bytes(gzip.compress("".join(json.dumps(p) + "\n" for p in problems).encode()))
    return path


RETURNS_1 = {"n": {" ": 5.0}, " ": {"1": 5.0}, "1": {"\n": 5.0}, "\n": {"\n": 5.0}}


def test_humaneval_layout_runs_the_tests_on_the_completion(tmp_path):
    humaneval_file(tmp_path / "HumanEval.jsonl.gz")
    (tmp_path / "task.yaml").write_text(yaml.safe_dump({"data": "HumanEval.jsonl.gz", "layout": "humaneval",
                                                        "max_tokens": 6}))
    task = load_task_file(tmp_path / "task.yaml")
    assert task.items[1].where.endswith("HumanEval.jsonl.gz:2")
    model = bigram_model(table({"z": 0.0}, RETURNS_1))
    with pytest.raises(UserError, match="--code-timeout"):
        score_task(model, Tokenizer.byte_level(), task)
    task.code_timeout = 20
    result = score_task(model, Tokenizer.byte_level(), task)
    assert [p["answer"] for p in result.per_item] == [" 1\n\n\n\n"] * 2  # six tokens
    assert [p["score"] for p in result.per_item] == [1.0, 0.0] and result.metrics["acc"] == 0.5


def test_cli_humaneval_needs_code_timeout(tmp_path, capsys):
    model = save_bigram(tmp_path / "model", table({"z": 0.0}, RETURNS_1))
    (tmp_path / "root" / "humaneval").mkdir(parents=True)
    humaneval_file(tmp_path / "root" / "humaneval" / "HumanEval.jsonl.gz")
    flags = ["eval", str(model), "--task", "humaneval", "--data-root", str(tmp_path / "root"), "--dtype", "fp32"]
    assert main(flags) == 2
    assert "--code-timeout SECONDS" in capsys.readouterr().err
    assert main([*flags, "--code-timeout", "20"]) == 0
    line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("humaneval")][0]
    assert line.split()[1:3] == ["2", "0.5000"]
