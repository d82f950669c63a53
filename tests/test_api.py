"""The Python API does what the CLI does, without a subprocess."""

import pytest

import commonlm
from commonlm.errors import UserError


def test_train_load_generate_evaluate(byte_data, tmp_path):
    config = commonlm.load_config("tiny", ["model.n_layer=2", "model.d_model=64", "model.max_seq_len=32",
                                           "train.max_steps=6", "train.micro_batch_size=4", "train.eval_every=0",
                                           "train.threads=1"])
    result = commonlm.pretrain(config, data=byte_data, out=tmp_path / "run")
    assert result.step == 6 and result.final_dir == tmp_path / "run" / "final"

    m = commonlm.load(tmp_path / "run")
    assert m.path == result.final_dir and "llama" in repr(m)
    text = m.generate("the ", max_tokens=12, temperature=0.9, seed=1)
    assert text == m.generate("the ", max_tokens=12, temperature=0.9, seed=1)
    assert "".join(m.stream("the ", max_tokens=12, temperature=0.9, seed=1)) == text
    score = m.evaluate(byte_data)
    assert score.tokens > 0 and score.loss == pytest.approx(result.val["val_loss"], rel=1e-3)


def test_load_explains_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        commonlm.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model here"):
        commonlm.load(tmp_path / "empty")
