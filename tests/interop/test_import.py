"""Hugging Face model directories made locally (random weights, no hub) import exactly, and go back out."""

import json

import pytest
import torch

from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.interop.importer import import_hf
from commonlm.modeldir import load_model_dir

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
REFERENCES = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, rope_theta=50000.0, tie_word_embeddings=False),
    "llama-bias-tied": lambda: transformers.LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True,
                                                        tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=True),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=264, n_embd=64, n_layer=2, n_head=4, n_positions=64),
}


def make_reference(kind, directory, shard=False):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(REFERENCES[kind]()).eval()
    with torch.no_grad():  # non-trivial norms and biases, so every tensor's mapping matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory, max_shard_size="60KB" if shard else "5GB")
    Tokenizer.byte_level().save(directory)
    return model


@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_import_is_exact_and_exports_back(kind, tmp_path):
    ref = make_reference(kind, tmp_path / "hf", shard=kind == "llama")
    if kind == "llama":
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours, _, _ = load_model_dir(tmp_path / "ours")
    ours.eval()
    idx = torch.randint(0, 264, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(idx).logits
        assert (ours(idx)[0] - expected).abs().max().item() < 1e-4
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert type(back) is type(ref)
        assert (back(idx).logits - expected).abs().max().item() < 1e-4


def test_refuses_rope_scaling_it_does_not_implement(tmp_path):
    make_reference("llama", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "longrope", "factor": 8.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="rope_scaling.rope_type='longrope'"):
        import_hf(tmp_path / "hf", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_refuses_pickle_checkpoints_without_unpickling(tmp_path):
    make_reference("qwen3", tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(UserError, match="never unpickles"):
        import_hf(tmp_path / "hf", tmp_path / "ours")


def test_shape_mismatch_and_unknown_architecture(tmp_path):
    make_reference("qwen2", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(UserError, match="do not match config.json"):
        import_hf(tmp_path / "hf", tmp_path / "a")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    with pytest.raises(UserError, match="model_type='mamba'"):
        import_hf(tmp_path / "hf", tmp_path / "b")


def test_continue_pretraining_an_imported_model(tmp_path):
    from commonlm.config import load_config
    from commonlm.data.loader import TokenData
    from commonlm.data.prepare import prepare
    from commonlm.evaluate.evaluate import evaluate
    from commonlm.train.metrics import read_metrics
    from commonlm.train.trainer import train
    from tests.conftest import synthetic_corpus

    make_reference("qwen3", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    corpus = synthetic_corpus(tmp_path / "corpus", n_docs=30)
    prepare([str(corpus)], tmp_path / "ours", tmp_path / "data", val_fraction=0.2, workers=1, progress=False)
    config = load_config(None, ["train.max_steps=4", "train.micro_batch_size=2", "train.seq_len=32",
                                "train.dtype=fp32", "train.eval_every=2", "train.threads=1"])
    config.data.path = str(tmp_path / "data")
    result = train(config, tmp_path / "run", init=tmp_path / "ours")
    first_eval = next(r for r in read_metrics(tmp_path / "run") if "val_loss" in r)
    imported, _, _ = load_model_dir(tmp_path / "ours")
    direct = evaluate(imported, TokenData(tmp_path / "data"), 32, max_tokens=config.train.eval_tokens)
    assert first_eval["step"] == 0 and first_eval["val_loss"] == pytest.approx(direct.loss, abs=1e-5)
    assert result.model.config.family == "qwen3" and result.final_dir is not None


def test_import_keeps_a_chat_template_saved_as_chat_template_jinja(tmp_path):
    """Current transformers saves the template in chat_template.jinja, not in tokenizer_config.json: import
    dropped it (chat then failed, and the GGUF had none)."""
    make_reference("qwen3", tmp_path / "hf")
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "hf")
    hf_tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    hf_tok.save_pretrained(tmp_path / "hf")
    if not (tmp_path / "hf" / "chat_template.jinja").is_file():
        pytest.skip("this transformers keeps the template in tokenizer_config.json")
    assert not json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text()).get("chat_template")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    _, tok, _ = load_model_dir(tmp_path / "ours")
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == hf_tok.apply_chat_template(messages, tokenize=False) == "[user] hi\n"
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "ours").chat_template == hf_tok.chat_template


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    """Ids past the embedding table crashed generation with an IndexError; refuse at import and at load."""
    make_reference("llama", tmp_path / "hf")  # 264 embedding rows, a byte tokenizer of 264 tokens
    import_hf(tmp_path / "hf", tmp_path / "ours")
    bigger = Tokenizer.train_bpe(["def f(x):\n    return x + 1\n", "the quick brown fox"] * 20, vocab_size=300)
    for directory in (tmp_path / "hf", tmp_path / "ours"):
        bigger.save(directory)
    with pytest.raises(UserError, match=r"tokenizer has 29\d tokens but the model embeds only 264"):
        import_hf(tmp_path / "hf", tmp_path / "again")
    with pytest.raises(UserError, match=r"ours: the tokenizer has 29\d tokens but the model embeds only 264"):
        load_model_dir(tmp_path / "ours")
