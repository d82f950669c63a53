"""Rewards: the built-in checkers, a user's FILE.py:FUNCTION, and a reward that raises (0.0, said once)."""

import pytest

from commonlm.errors import UserError
from commonlm.tune.rewards import Scorer, check_reward, exact, final_number, gsm8k, load_reward


@pytest.mark.parametrize("completion, answer, want", [
    ("The answer is 72.", "72", 1.0),
    ("3 + 4 = 7, so 7 apples", "Natalia sold 48/2 = 24 clips...\n#### 7", 1.0),
    ("It costs $1,000.", "1000", 1.0),
    ("-5", "-5", 1.0),
    ("12.50", "12.5", 1.0),
    ("71", "72", 0.0),
    ("72 then 71", "72", 0.0),  # the final number counts
    ("no number here", "3", 0.0),
    ("3", "no number", 0.0),
])
def test_gsm8k_compares_final_numbers(completion, answer, want):
    assert gsm8k(completion, answer, "q") == want


def test_final_number_and_exact():
    assert final_number("a 1 b 2,500 c") == 2500.0
    assert final_number("nothing") is None
    assert exact("  42\n", "42", "q") == 1.0 and exact("42.", "42", "q") == 0.0


def test_a_users_function_is_loaded_from_a_file(tmp_path):
    (tmp_path / "mine.py").write_text("def length(completion, answer, prompt):\n    return len(completion) / 10\n")
    fn = load_reward(f"{tmp_path / 'mine.py'}:length")
    assert fn("abcde", "x", "p") == 0.5
    assert load_reward("gsm8k") is gsm8k and load_reward("exact") is exact


@pytest.mark.parametrize("spec, match", [
    ("nonsense", "not a checker name; use gsm8k, exact or FILE.py:FUNCTION"),
    ("missing.py:f", "no file missing.py"),
])
def test_bad_specs_are_one_line_errors_before_anything_runs(spec, match):
    with pytest.raises(UserError, match=match) as e:
        check_reward(spec)
    assert "\n" not in str(e.value)


def test_a_file_without_the_function_or_that_fails_to_import(tmp_path):
    (tmp_path / "mine.py").write_text("x = 1\n")
    with pytest.raises(UserError, match="defines no function 'reward'"):
        load_reward(f"{tmp_path / 'mine.py'}:reward")
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    with pytest.raises(UserError, match="importing .*broken.py failed \\(ModuleNotFoundError"):
        load_reward(f"{tmp_path / 'broken.py'}:reward")


def test_a_reward_that_raises_scores_zero_and_is_reported_once_per_error(capsys):
    def picky(completion, answer, prompt):
        if completion.startswith("boom"):
            raise ValueError(f"cannot parse {completion}")
        if completion == "none":
            return None
        return 1.0

    score = Scorer(picky)
    assert [score(c, "a", f"prompt {i}") for i, c in enumerate(["ok", "boom", "boom 2", "none", "ok"])] == \
        [1.0, 0.0, 0.0, 0.0, 1.0]
    err = capsys.readouterr().err
    assert err.count("ValueError: cannot parse") == 1 and "'prompt 1'" in err  # once, naming the first prompt
    assert err.count("TypeError: returned None, not a finite number") == 1
