"""The compiled decode step (infer/compiled.py): same logits and tokens as eager decoding, one graph per
model, and a model changed in place is compiled again rather than run through a stale graph."""

import dataclasses

import pytest
import torch

from commonlm.infer.compiled import compiled_decode_step, static_cache_length
from commonlm.infer.generate import generate_ids
from commonlm.infer.quant import quantize_model
from commonlm.model.decoder import Decoder
from commonlm.model.kv_cache import StaticKVCache

from .test_generate import random_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def compiled_and_eager_logits(model, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits for tokens 4..11 of a random sequence: from the compiled step (after an eager prefill of
    tokens 0..3) and from a full eager forward. Also used by tests/gpu."""
    idx = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(seed))
    idx = idx.to(model.embed.weight.device)
    step = compiled_decode_step(model)
    with torch.inference_mode():
        full, _ = model(idx)
        cache = model.new_cache(1, 32, kind=StaticKVCache)
        model(idx[:, :4], cache=cache)
        steps = torch.stack([step(idx[:, t : t + 1], cache) for t in range(4, 12)], dim=1)
    return steps, full[:, 4:12]


def compiled_logits_match(model, seed: int = 0) -> float:
    """The largest difference between compiled-step logits and a full eager forward (fp32)."""
    steps, full = compiled_and_eager_logits(model, seed)
    assert full.abs().max() > 0.5  # not a comparison of near-zero logits
    return (steps - full).abs().max().item()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compiled_step_matches_eager(family):
    assert compiled_logits_match(random_model(family, scale=0.1)) < 1e-4


def test_compiled_greedy_tokens_equal_eager():
    model = random_model("gpt2", scale=0.3).to(torch.bfloat16)
    prompt = [5, 17, 99, 3, 250]
    eager = generate_ids(model, prompt, max_tokens=40, temperature=0.0)
    compiled = generate_ids(model, prompt, max_tokens=40, temperature=0.0, compile=True)
    assert len(set(eager)) > 3  # the model does not just repeat one token
    assert compiled == eager


def test_each_model_runs_its_own_graph():
    # a and b differ only in their weights; c has a's KV-cache shapes but a wider MLP (what guards on
    # the cache alone could not tell apart)
    a, b = random_model("gpt2", seed=1, scale=0.1), random_model("gpt2", seed=2, scale=0.1)
    torch.manual_seed(3)
    c = Decoder(dataclasses.replace(a.config, d_ff=2 * a.config.ff_dim)).eval()
    for model in (a, b, a, c, a):
        assert compiled_logits_match(model) < 1e-4
    assert compiled_decode_step(a) is compiled_decode_step(a)
    assert compiled_decode_step(a) is not compiled_decode_step(b)


def test_a_model_changed_in_place_is_compiled_again():
    model = random_model("llama", scale=0.1)
    first = compiled_decode_step(model)
    quantize_model(model, "int8")
    assert compiled_decode_step(model) is not first
    assert compiled_logits_match(model) < 1e-4  # against the quantized model's own eager logits


def test_static_cache_lengths():
    assert static_cache_length(10, 4096) == 256
    assert static_cache_length(256, 4096) == 256
    assert static_cache_length(257, 4096) == 512
    assert static_cache_length(3000, 4096) == 4096
    assert static_cache_length(3000, 2048) == 2048


def test_no_compiler_is_a_clear_error(tmp_path, monkeypatch):
    import torch._inductor.config as inductor_config

    from commonlm.errors import UserError

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # nothing compiled earlier
    model = random_model("llama", seed=5, scale=0.1)
    with inductor_config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        with pytest.raises(UserError, match="No working C\\+\\+ compiler.*without --compile"):
            generate_ids(model, [1, 2, 3], max_tokens=4, temperature=0.0, compile=True)


def test_compiles_when_the_ci_variable_is_set(tmp_path):
    # Inductor refuses to make an op a fallback by itself when CI is set and a decomposition exists, which
    # is how our kept `mv`/`addmv` reach it; this failed on GitHub-style CI machines. A fresh process,
    # because the fallback registry is global and an earlier test may have filled it.
    import os
    import sys

    from tests.procs import run_captured

    code = (
        "import torch\n"
        "from commonlm.infer.generate import generate_ids\n"
        "from tests.infer.test_generate import random_model\n"
        "m = random_model('gpt2', scale=0.3).to(torch.bfloat16)\n"
        "e = generate_ids(m, [5, 17, 99], max_tokens=8, temperature=0.0)\n"
        "c = generate_ids(m, [5, 17, 99], max_tokens=8, temperature=0.0, compile=True)\n"
        "assert c == e, (c, e)\n"
    )
    env = {**os.environ, "CI": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "OMP_NUM_THREADS": "1"}
    done = run_captured([sys.executable, "-c", code], env=env,
                        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0, done.stderr[-2000:]
