"""The quickstart runs the whole spine on the standard library and reports before/after numbers."""

import pytest

from commonlm.quickstart import quickstart


@pytest.mark.slow
def test_quickstart_trains_and_improves(tmp_path, capsys):
    report = quickstart(out=tmp_path / "qs", max_steps=40)
    assert report["after"]["val_loss"] < report["before"]["val_loss"] - 1.0
    assert report["after"]["val_bpb"] < report["before"]["val_bpb"]
    for part in ("tokenizer/tokenizer.json", "data/index.json", "run/loss.png", "run/final/model.safetensors"):
        assert (tmp_path / "qs" / part).is_file(), part
    printed = capsys.readouterr().out
    assert printed.count("def") >= 1 and "class" in printed
