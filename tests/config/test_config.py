"""Run configuration: YAML presets, `--set` overrides, validation errors that name the key, round trips."""

import re

import pytest
import torch

from commonlm.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    list_presets,
    load_config,
    parse_override,
)
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.model.decoder import Decoder

# -- parse_override / apply_overrides -----------------------------------------------------------------


@pytest.mark.parametrize(
    "item, key, value, kind",
    [
        ("train.lr=3e-4", "train.lr", 3e-4, float),  # YAML alone would read this as a string
        ("train.lr=3.0e-4", "train.lr", 3e-4, float),
        ("train.lr=-2E-3", "train.lr", -2e-3, float),
        ("train.lr=0.5", "train.lr", 0.5, float),
        ("model.n_layer=8", "model.n_layer", 8, int),
        ("train.compile=true", "train.compile", True, bool),
        ("model.tie_embeddings=false", "model.tie_embeddings", False, bool),
        ("train.device=cuda:1", "train.device", "cuda:1", str),
        ("data.path=runs/data.v2", "data.path", "runs/data.v2", str),
        ("data.path=a=b", "data.path", "a=b", str),  # only the first '=' splits
        (" model.family = gpt2", "model.family", "gpt2", str),
        ("data.path=", "data.path", "", str),
    ],
)
def test_parse_override_types(item, key, value, kind):
    k, v = parse_override(item)
    assert k == key
    assert type(v) is kind
    assert v == value


def test_parse_override_without_equals_is_a_user_error():
    with pytest.raises(UserError, match="train.lr"):
        parse_override("train.lr")


def test_apply_overrides_dotted_keys_build_nested_sections():
    data = {"model": {"n_layer": 4, "d_model": 128}}
    out = apply_overrides(data, ["model.n_layer=6", "train.lr=1e-3", "data.path=/x", "train.seed=7"])
    assert out == {
        "model": {"n_layer": 6, "d_model": 128},
        "train": {"lr": 1e-3, "seed": 7},
        "data": {"path": "/x"},
    }


def test_apply_overrides_later_wins():
    out = apply_overrides({}, ["train.lr=1e-3", "train.lr=2e-3"])
    assert out["train"]["lr"] == 2e-3


def test_override_into_a_scalar_is_rejected():
    with pytest.raises(UserError, match="n_layer"):
        apply_overrides({"model": {"n_layer": 4}}, ["model.n_layer.x=1"])


def test_load_config_preset_with_overrides():
    cfg = load_config("tiny", ["train.lr=3e-4", "model.n_layer=2", "train.compile=true", "model.qk_norm=true"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.n_layer == 2
    assert cfg.train.compile is True and cfg.model.qk_norm is True
    # the rest of the preset is kept
    assert cfg.model.d_model == 128 and cfg.model.max_seq_len == 128 and cfg.train.max_steps == 200


def test_load_config_without_name_gives_defaults():
    assert load_config() == RunConfig()
    assert load_config(None, ["train.seed=3"]).train.seed == 3


def test_ints_accepted_where_floats_expected():
    cfg = load_config(None, ["train.lr=1", "model.rope_theta=500000", "train.max_time=60"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert isinstance(cfg.model.rope_theta, float) and cfg.model.rope_theta == 500000.0
    assert isinstance(cfg.train.max_time, float) and cfg.train.max_time == 60.0


def test_integral_floats_accepted_where_ints_expected():
    cfg = load_config(None, ["model.n_layer=6.0", "train.seed=1e3"])
    assert cfg.model.n_layer == 6 and type(cfg.model.n_layer) is int
    assert cfg.train.seed == 1000 and type(cfg.train.seed) is int


def test_config_from_dict_builds_nested_dataclasses():
    cfg = config_from_dict({"model": {"family": "gpt2", "pos_emb": "learned"}, "train": {"lr": 2}, "data": None})
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.train, TrainConfig)
    assert isinstance(cfg.data, DataConfig)
    assert cfg.model.family == "gpt2" and cfg.train.lr == 2.0


# -- rejections: UserError naming the key --------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        # unknown keys
        (["foo=1"], "foo"),
        (["foo.bar=1"], "foo"),
        (["model.n_layers=2"], "model.n_layers"),
        (["train.learning_rate=1e-3"], "train.learning_rate"),
        # wrong types
        (["model.n_layer=abc"], "model.n_layer"),
        (["model.n_layer=4.5"], "model.n_layer"),
        (["model.n_layer=true"], "model.n_layer"),
        (["train.lr=fast"], "train.lr"),
        (["train.lr=true"], "train.lr"),
        (["train.compile=1"], "train.compile"),
        (["train.compile=maybe"], "train.compile"),
        (["model.qk_norm=0"], "model.qk_norm"),
        (["data.path=true"], "data.path"),
        (["model=3"], "model"),
        # Literal values not among the choices
        (["model.family=gpt3"], "model.family"),
        (["model.norm=batchnorm"], "model.norm"),
        (["model.mlp=relu"], "model.mlp"),
        (["model.pos_emb=alibi"], "model.pos_emb"),
        (["train.schedule=linear"], "train.schedule"),
        (["train.dtype=fp16"], "train.dtype"),
        (["train.nonfinite=ignore"], "train.nonfinite"),
        # cross-field checks
        (["model.d_model=100", "model.n_head=3"], "model.d_model"),
        (["model.n_head=4", "model.n_kv_head=3"], "model.n_kv_head"),
        (["model.n_head=4", "model.n_kv_head=8"], "model.n_kv_head"),
        (["model.max_seq_len=128", "train.seq_len=256"], "train.seq_len"),
        (["model.n_head=2", "model.d_model=36", "model.head_dim=9"], "model.head_dim"),  # rope needs even
        # out of range
        (["model.n_layer=0"], "model.n_layer"),
        (["model.n_layer=-1"], "model.n_layer"),
        (["model.n_head=-4"], "model.n_head"),
        (["model.d_model=-128"], "model.d_model"),
        (["model.max_seq_len=-1"], "model.max_seq_len"),
        (["model.vocab_size=-1"], "model.vocab_size"),
        (["model.n_kv_head=-1"], "model.n_kv_head"),
        (["model.dropout=-0.1"], "model.dropout"),
        (["model.dropout=1.0"], "model.dropout"),
        (["model.rope_theta=0"], "model.rope_theta"),
        (["model.norm_eps=0"], "model.norm_eps"),
        (["train.lr=0"], "train.lr"),
        (["train.lr=-3e-4"], "train.lr"),
        (["train.micro_batch_size=0"], "train.micro_batch_size"),
        (["train.max_steps=-5"], "train.max_steps"),
        (["train.warmup_steps=-1"], "train.warmup_steps"),
        (["train.seq_len=-1"], "train.seq_len"),
        (["train.weight_decay=-0.1"], "train.weight_decay"),
        (["train.grad_clip=-1"], "train.grad_clip"),
        (["train.max_time=-1"], "train.max_time"),
        (["train.target_val_loss=-1"], "train.target_val_loss"),
        (["train.min_lr_ratio=1.5"], "train.min_lr_ratio"),
        (["train.decay_fraction=0"], "train.decay_fraction"),
        (["train.beta1=1.0"], "train.beta1"),
        (["train.beta2=-0.1"], "train.beta2"),
        (["train.eps=0"], "train.eps"),
    ],
)
def test_bad_values_raise_user_error_naming_the_key(overrides, key):
    with pytest.raises(UserError) as info:
        load_config("tiny", overrides)
    assert re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", str(info.value)), str(info.value)


@pytest.mark.parametrize(
    "overrides, key",
    [
        # Negative sizes that validate() does not catch today: the model build then fails with a raw
        # RuntimeError (negative dimension / negative std) instead of a UserError naming the key.
        (["model.head_dim=-32"], "model.head_dim"),
        (["model.d_ff=-1"], "model.d_ff"),
        (["model.init_std=-0.02"], "model.init_std"),
    ],
)
def test_negative_sizes_raise_user_error_naming_the_key(overrides, key):
    with pytest.raises(UserError, match=re.escape(key)):
        load_config("tiny", overrides)


def test_literal_error_lists_the_choices():
    with pytest.raises(UserError, match="gpt2.*llama.*mistral.*qwen2.*qwen3"):
        load_config(None, ["model.family=mamba"])


def test_unknown_key_error_lists_the_known_keys():
    with pytest.raises(UserError, match="n_layer"):
        load_config(None, ["model.layers=2"])


def test_seq_len_equal_to_max_seq_len_is_fine():
    cfg = load_config("tiny", ["train.seq_len=128"])
    assert cfg.train.seq_len == cfg.model.max_seq_len == 128


def test_unknown_preset_name():
    with pytest.raises(UserError, match="no-such-preset") as info:
        load_config("no-such-preset")
    assert "tiny" in str(info.value)  # lists the presets


def test_preset_by_file_name_resolves():
    assert load_config("tiny.yaml") == load_config("tiny")
    assert load_config("configs/tiny.yaml") == load_config("tiny")


def test_invalid_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: [1, 2\n  d_model: 64\n")
    with pytest.raises(UserError, match="bad.yaml"):
        load_config(str(bad))


def test_yaml_file_that_is_not_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(str(bad))


def test_yaml_file_with_unknown_nested_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_layer: 2\n  width: 64\n")
    with pytest.raises(UserError, match=r"model\.width"):
        load_config(str(path))


def test_yaml_file_loads_and_overrides_apply_on_top(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_layer: 2\n  d_model: 64\ntrain:\n  lr: 1.0e-3\n")
    cfg = load_config(str(path), ["model.n_layer=3"])
    assert cfg.model.n_layer == 3 and cfg.model.d_model == 64 and cfg.train.lr == 1e-3


# -- presets ------------------------------------------------------------------------------------------


def test_presets_exist():
    names = list_presets()
    for expected in ["tiny", "gpt2-small", "llama-1b", "qwen3-0.6b", "nanogpt-cpu", "bytes-cpu"]:
        assert expected in names


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads_and_validates(name):
    cfg = load_config(name)
    assert cfg.validate() is cfg
    seq = cfg.train.seq_len or cfg.model.max_seq_len
    assert seq <= cfg.model.max_seq_len
    if cfg.model.family == "gpt2":  # exports as GPT2LMHeadModel: needs GPT-2's layout
        assert (cfg.model.pos_emb, cfg.model.norm, cfg.model.bias) == ("learned", "layernorm", True)
    else:
        assert (cfg.model.pos_emb, cfg.model.norm, cfg.model.mlp) == ("rope", "rmsnorm", "swiglu")
    assert cfg.model.qk_norm == (cfg.model.family == "qwen3")


def _meta_params(name: str, vocab: int) -> tuple[int, int]:
    cfg = load_config(name).model
    cfg.vocab_size = vocab
    with torch.device("meta"):
        model = Decoder(cfg)
    assert model.embed.weight.is_meta
    return model.num_params(), model.num_params(exclude_embeddings=True)


# Exact counts of the reference models (Hugging Face's GPT-2 checkpoints, TinyLlama-1.1B, Qwen3-0.6B):
# these presets promise those shapes, and export to the matching transformers classes.
EXACT = {
    ("gpt2-small", 50257): 124_439_808,
    ("gpt2-medium", 50257): 354_823_168,
    ("gpt2-large", 50257): 774_030_080,
    ("gpt2-xl", 50257): 1_557_611_200,
    ("llama-1b", 32000): 1_100_048_384,
    ("qwen3-0.6b", 151936): 596_049_920,
}

# What the preset's name or comment says, and how close "about" has to be.
NOMINAL = [
    ("gpt2-small", 50257, 124e6, 0.02),
    ("gpt2-medium", 50257, 355e6, 0.02),
    ("gpt2-large", 50257, 774e6, 0.02),
    ("gpt2-xl", 50257, 1.56e9, 0.02),
    ("llama-125m", 32000, 125e6, 0.02),
    ("llama-400m", 32000, 400e6, 0.02),
    ("llama-1b", 32000, 1.1e9, 0.02),
    ("qwen3-100m", 32000, 100e6, 0.02),
    ("qwen3-0.6b", 151936, 0.6e9, 0.02),
    ("tiny", 264, 1e6, 0.15),
    ("tiny", 32000, 5e6, 0.02),
    ("speedrun-cpu", 320, 0.68e6, 0.01),  # the byte tokenizer's 264 tokens, rounded up to 320
    ("bytes-cpu", 320, 0.68e6, 0.01),  # its comment's count, at the vocabulary the preset sets
]


@pytest.mark.parametrize("name, vocab, expected, rel", NOMINAL, ids=[f"{n}-{v}" for n, v, _, _ in NOMINAL])
def test_preset_parameter_count_matches_its_name(name, vocab, expected, rel):
    total, _ = _meta_params(name, vocab)
    assert abs(total - expected) <= rel * expected, f"{name}: {total:,} parameters, expected ~{expected:,.0f}"
    if (name, vocab) in EXACT:
        assert total == EXACT[(name, vocab)]


def test_nanogpt_cpu_preset_is_nanogpts_shakespeare_char_model():
    total, _ = _meta_params("nanogpt-cpu", 65)
    # nanoGPT prints "number of parameters: 0.80M" (it leaves out the position embeddings)
    non_position = total - 64 * 128
    assert abs(non_position - 0.80e6) < 0.005e6, non_position


SIZE_IN_NAME = re.compile(r"-(\d+(?:\.\d+)?)([mb])$")


@pytest.mark.parametrize("name", [n for n in list_presets() if SIZE_IN_NAME.search(n)])
def test_size_in_preset_name_is_honest(name):
    """Any preset named like `family-125m` / `family-0.6b` is within 15% of that size (realistic vocab)."""
    m = SIZE_IN_NAME.search(name)
    nominal = float(m.group(1)) * (1e6 if m.group(2) == "m" else 1e9)
    family = load_config(name).model.family
    vocab = {"gpt2": 50257, "qwen3": 151936 if nominal >= 0.5e9 else 32000}.get(family, 32000)
    total, _ = _meta_params(name, vocab)
    assert abs(total - nominal) <= 0.15 * nominal, f"{name}: {total:,}"


# -- round trip ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_presets())
def test_save_then_load_round_trips(name, tmp_path):
    cfg = load_config(name, ["train.lr=3e-4", "train.eps=1e-8", "data.path=some/dir", "model.vocab_size=320"])
    path = tmp_path / "commonlm.yaml"
    cfg.save(path)
    again = load_config(str(path))
    assert again == cfg
    assert type(again.train.lr) is float and type(again.model.n_layer) is int


def test_save_round_trips_non_default_values(tmp_path):
    cfg = RunConfig(
        model=ModelConfig(family="qwen3", vocab_size=1000, n_layer=3, n_head=6, n_kv_head=2, d_model=96,
                          head_dim=32, d_ff=200, max_seq_len=77, rope_theta=1e6, norm_eps=1e-6, qk_norm=True,
                          bias=True, tie_embeddings=False, init_std=0.01, dropout=0.1),
        data=DataConfig(path="/tmp/x y/data"),
        train=TrainConfig(seed=5, dtype="fp32", seq_len=64, lr=1.5e-4, schedule="wsd", decay_fraction=0.3,
                          compile=True, activation_checkpointing=True, nonfinite="stop", max_time=12.5,
                          target_val_loss=1.88),
    ).validate()
    path = tmp_path / "run" / "commonlm.yaml"
    cfg.save(path)
    assert load_config(str(path)) == cfg
    assert load_config(str(path)) != RunConfig()


def test_yaml_numbers_that_pyyaml_reads_as_strings_are_accepted(tmp_path):
    """PyYAML reads `lr: 3e-4` as the string '3e-4' (YAML 1.1 wants 3.0e-4); it was refused."""
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_layer: '2'\n  rope_theta: 1e6\ntrain:\n  lr: 3e-4\n  min_lr_ratio: 1E-2\n")
    cfg = load_config(str(path))
    assert cfg.train.lr == 3e-4 and type(cfg.train.lr) is float and cfg.train.min_lr_ratio == 0.01
    assert cfg.model.rope_theta == 1e6 and cfg.model.n_layer == 2 and type(cfg.model.n_layer) is int
    path.write_text("train:\n  lr: fast\n")
    with pytest.raises(UserError, match="train.lr='fast' must be a number"):
        load_config(str(path))
    path.write_text("model:\n  n_layer: 3e-4\n")
    with pytest.raises(UserError, match="model.n_layer=0.0003 must be an integer"):
        load_config(str(path))


def test_bytes_cpu_preset_fits_the_byte_tokenizer():
    """bytes-cpu sets the byte vocabulary (so `commonlm presets` counts it right): the byte tokenizer's size
    rounded up to 64, as `train` rounds it; bench/bytes_vs_bpe.py gives its BPE model a quarter of its context."""
    cfg = load_config("bytes-cpu")
    assert cfg.model.vocab_size == 64 * -(-Tokenizer.byte_level().vocab_size // 64)
    assert cfg.model.max_seq_len % 4 == 0
