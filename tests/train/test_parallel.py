"""The parallelize seam: a model built on the meta device and initialised in place starts from the weights a
model built on the host gets (bit for bit on CPU), and whole state dicts come from full_state_dict."""

import pytest
import torch

from commonlm.config import load_config
from commonlm.train.parallel import build_model, full_state_dict, init_weights, parallelize
from commonlm.world import World


@pytest.mark.parametrize("preset", ["tiny", "nanogpt-cpu", "qwen3-100m"])
def test_meta_build_then_init_equals_building_on_the_host(preset):
    config = load_config(preset, ["model.vocab_size=320", "model.n_layer=2"])
    host = build_model(config, meta=False)
    meta = build_model(config, meta=True)
    assert next(meta.parameters()).is_meta
    init_weights(meta, config.train.seed, torch.device("cpu"))
    want, got = host.state_dict(), meta.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert (meta.lm_head.weight is meta.embed.weight) == config.model.tie_embeddings


def test_parallelize_in_one_process_keeps_the_model_and_its_names():
    config = load_config("tiny", ["model.vocab_size=320", "model.n_layer=2"])
    model = build_model(config, meta=False)
    assert parallelize(model, config, World(), torch.device("cpu")) is model
    assert full_state_dict(model).keys() == model.state_dict().keys()


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(byte_data, tmp_path):
    """train.compile compiles each block in place, before any data-parallel wrap: the same losses as eager
    (to float tolerance: Inductor fuses differently), and checkpoints with the same tensor names."""
    from commonlm.train.trainer import train
    from tests.train.test_trainer import small_config, train_losses

    eager = train(small_config(byte_data, "train.max_steps=3"), tmp_path / "eager")
    compiled = train(small_config(byte_data, "train.max_steps=3", "train.compile=true"), tmp_path / "compiled")
    for a, b in zip(train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled"), strict=True):
        assert abs(a - b) < 1e-4
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()
    assert (tmp_path / "compiled" / "final" / "model.safetensors").is_file()
