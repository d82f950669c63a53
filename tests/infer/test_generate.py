"""Sampling and generation: sample_next, greedy/seeded generation with the KV cache, streaming and stops."""

import copy
from collections import Counter

import pytest
import torch

from commonlm.config import ModelConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.infer.generate import SamplingParams, generate_ids, generate_text, sample_next, stream_text
from commonlm.model.decoder import Decoder

pytestmark = pytest.mark.usefixtures("one_thread")


VOCAB = 320  # the byte tokenizer's 264 ids, padded to a multiple of 64
CONTEXT = 64


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.byte_level()


def random_model(family: str = "llama", seed: int = 0, scale: float = 0.0) -> Decoder:
    if family == "gpt2":
        config = ModelConfig(family="gpt2", pos_emb="learned", norm="layernorm", mlp="gelu_tanh", bias=True,
                             n_layer=2, n_head=4, d_model=64, max_seq_len=CONTEXT, vocab_size=VOCAB)
    else:
        config = ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=CONTEXT,
                             vocab_size=VOCAB)
    torch.manual_seed(seed)
    model = Decoder(config).eval()
    if scale:  # bigger weights: peakier, more position-dependent logits
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="module")
def model() -> Decoder:
    return random_model(scale=0.1)


def bigram_model(transitions: dict[int, int], vocab: int = VOCAB, context: int = CONTEXT) -> Decoder:
    """A decoder whose next token is a fixed function of the current one (with near-certainty).

    Attention and MLP outputs are zeroed, so the final hidden state is the current token's embedding.
    Each source token gets a one-hot embedding on its own dimension, and the lm_head row of its
    successor reads that dimension with a large weight (logit ~160 against ~0.2 for every other id).
    """
    config = ModelConfig(family="llama", n_layer=1, n_head=4, d_model=64, max_seq_len=context, vocab_size=vocab,
                         tie_embeddings=False)
    torch.manual_seed(0)
    model = Decoder(config).eval()
    assert len(transitions) <= config.d_model
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight.zero_()
            block.mlp.proj.weight.zero_()
        for dim, (src, dst) in enumerate(transitions.items()):
            model.embed.weight[src].zero_()
            model.embed.weight[src, dim] = 1.0
            model.lm_head.weight[dst, dim] = 20.0
    return model


CYCLE = "é€ab"  # seven bytes, all different: C3 A9 E2 82 AC 61 62


def cycle_transitions(text: str = CYCLE) -> dict[int, int]:
    b = list(text.encode("utf-8"))
    assert len(set(b)) == len(b)
    return {b[i]: b[(i + 1) % len(b)] for i in range(len(b))}


@pytest.fixture(scope="module")
def cycle() -> Decoder:
    return bigram_model(cycle_transitions())


def pieces(model, tok, prompt, **params) -> list[str]:
    return list(stream_text(model, tok, prompt, SamplingParams(**params)))


def greedy_by_full_forward(model: Decoder, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


def greedy_disagreements(reference: Decoder, prompt: list[int], tokens: list[int], tol: float = 0.03) -> list[int]:
    """The steps at which `tokens`, a greedy continuation of `prompt` computed elsewhere (another device, dtype or
    kernel), is not `reference`'s greedy choice after the same prefix: its logit falls more than `tol` times the
    step's largest |logit| below the best. One full forward over prompt + tokens (teacher forcing), so a near-tie
    decided the other way flags its own step, not every later one. Also used by tests/gpu."""
    ids = torch.tensor([prompt + tokens], device=reference.embed.weight.device)
    with torch.no_grad():
        logits = reference(ids)[0][0, len(prompt) - 1 : -1].float().cpu()
    chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    gaps = (logits.amax(-1) - chosen) / logits.abs().amax(-1)
    return [step for step, gap in enumerate(gaps.tolist()) if gap > tol]


# -- sample_next ------------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax():
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample_next(logits, temperature=0.0, top_k=5, top_p=0.5), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.05, 1.0, 5.0, 100.0])
def test_top_k_one_is_argmax_at_any_temperature(temperature):
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1)).repeat(250, 1)  # 2000 rows
    g = torch.Generator().manual_seed(2)
    assert torch.equal(sample_next(logits, temperature, top_k=1, generator=g), logits.argmax(-1))


def test_top_k_keeps_exactly_the_k_most_likely():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0, 2.0, 0.5]]).repeat(4000, 1)
    draws = sample_next(logits, 3.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 3, 5}


# probabilities of tokens 0..5 in a shuffled order of likelihood
PROBS = torch.tensor([0.07, 0.25, 0.03, 0.5, 0.15, 0.0])


@pytest.mark.parametrize(
    "top_p, nucleus",
    [
        (0.3, {3}),  # 0.5 already reaches 0.3
        (0.7, {3, 1}),  # 0.5 < 0.7 <= 0.75
        (0.8, {3, 1, 4}),  # 0.75 < 0.8 <= 0.9
        (0.95, {3, 1, 4, 0}),  # 0.9 < 0.95 <= 0.97
        (0.99, {3, 1, 4, 0, 2}),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, nucleus):
    logits = PROBS.clamp_min(1e-12).log().repeat(6000, 1)
    draws = sample_next(logits, 1.0, top_p=top_p, generator=torch.Generator().manual_seed(0))
    counts = Counter(draws.tolist())
    assert set(counts) == nucleus  # nothing outside is ever drawn, everything inside is
    mass = sum(PROBS[i].item() for i in nucleus)
    for i in nucleus:  # renormalised inside the nucleus
        assert abs(counts[i] / len(draws) - PROBS[i].item() / mass) < 0.025, (i, counts)


def test_top_k_and_top_p_combine():
    logits = PROBS.clamp_min(1e-12).log().repeat(3000, 1)
    draws = sample_next(logits, 1.0, top_k=2, top_p=0.95, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {3, 1}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(temperature):
    logits = torch.tensor([0.6, 0.3, 0.1]).log()
    draws = sample_next(logits.repeat(20000, 1), temperature, generator=torch.Generator().manual_seed(0))
    want = (logits / temperature).softmax(-1)
    got = torch.bincount(draws, minlength=3).float() / len(draws)
    assert (got - want).abs().max() < 0.015, (got, want)


def test_same_seed_same_draws():
    logits = torch.randn(500, 40, generator=torch.Generator().manual_seed(3))
    draw = lambda s: sample_next(logits, 1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(s))
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


# -- generate_ids ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("prompt_len", [1, 9])
def test_greedy_matches_full_forward_argmax(family, prompt_len):
    model = random_model(family, seed=1, scale=0.1)
    prompt = torch.randint(0, 256, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    ours = generate_ids(model, prompt, max_tokens=30, temperature=0.0)
    assert ours == greedy_by_full_forward(model, prompt, 30)
    assert len(set(ours)) > 1  # not a degenerate constant output


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_disagreements_accepts_a_bf16_run_and_flags_a_wrong_token(family):
    """The check tests/gpu compares GPU greedy tokens with the CPU by: a bf16 run of the same weights passes against
    the fp32 model; the same tokens with the last one swapped for the fp32 model's worst choice are flagged there."""
    reference = random_model(family, seed=1, scale=0.1)
    prompt = [5, 17, 99]
    tokens = generate_ids(copy.deepcopy(reference).to(torch.bfloat16), prompt, max_tokens=24, temperature=0.0)
    assert len(tokens) == 24 and len(set(tokens)) > 1
    assert greedy_disagreements(reference, prompt, tokens) == []
    with torch.no_grad():
        worst = int(reference(torch.tensor([prompt + tokens[:-1]]))[0][0, -1].argmin())
    assert greedy_disagreements(reference, prompt, tokens[:-1] + [worst]) == [23]


@pytest.mark.parametrize("max_tokens", [0, 1, 5, 17])
def test_max_tokens_respected(model, max_tokens):
    for temperature in (0.0, 1.0):
        ids = generate_ids(model, [72, 105], max_tokens=max_tokens, temperature=temperature, seed=0)
        assert len(ids) == max_tokens


def test_same_seed_same_ids_different_seed_different_ids(model):
    kw = dict(max_tokens=40, temperature=1.0)
    a, b, c = (generate_ids(model, [1, 2, 3], seed=s, **kw) for s in (5, 5, 6))
    assert a == b
    assert a != c


def test_same_seed_identical_text_different_seeds_differ(model, tok):
    texts = [generate_text(model, tok, "Hello", SamplingParams(max_tokens=40, temperature=1.0, seed=s))
             for s in (11, 11, 12, 13)]
    assert texts[0] == texts[1]
    assert len(set(texts[1:])) == 3


def test_stops_at_stop_id_and_includes_it(cycle):
    # the cycle continues 0x61 ('a') -> 0x62 ('b') -> 0xC3 ...
    cont = list(b"ab" + "é€".encode() + b"ab\xc3")  # a b C3 A9 E2 82 AC a b C3
    assert generate_ids(cycle, [0xAC], max_tokens=10, temperature=0.0) == cont
    assert generate_ids(cycle, [0xAC], max_tokens=10, temperature=0.0, stop_ids=(0xC3,)) == [0x61, 0x62, 0xC3]
    assert generate_ids(cycle, [0xAC], max_tokens=10, temperature=1.0, seed=0, stop_ids=(0x62, 999)) == [0x61, 0x62]


@pytest.mark.parametrize("special", ["<|endoftext|>", "<|im_end|>", "<|im_start|>"])
def test_text_generation_stops_at_end_of_text(tok, special):
    end = tok.token_id(special)
    t = cycle_transitions()
    t[ord("b")] = end  # ... a -> b -> end -> (random)
    model = bigram_model(t)
    assert generate_ids(model, [0xAC], max_tokens=3, temperature=0.0) == [ord("a"), ord("b"), end]
    assert len(generate_ids(model, [0xAC], max_tokens=6, temperature=0.0)) == 6  # ids alone don't stop
    for temperature in (0.0, 1.0):
        params = SamplingParams(max_tokens=50, temperature=temperature, seed=1)
        assert generate_text(model, tok, "€", params) == "ab"
        assert generate_text(model, tok, "é", params) == "€ab"


@pytest.mark.parametrize("special", ["<|pad|>", "<|reserved_0|>"])
def test_other_control_tokens_never_show_in_the_text(tok, special):
    """A control token that does not end the reply is left out of its text (it once streamed literally)."""
    t = cycle_transitions("ab")
    t[ord("b")] = tok.token_id(special)
    t[tok.token_id(special)] = ord("a")  # a -> b -> special -> a ...
    model = bigram_model(t)
    assert generate_ids(model, [ord("a")], max_tokens=6, temperature=0.0)[:3] == [ord("b"), tok.token_id(special),
                                                                               ord("a")]
    assert generate_text(model, tok, "a", SamplingParams(max_tokens=6, temperature=0.0)) == "baba"


def test_prompt_longer_than_context_is_truncated_from_the_left(model):
    prompt = torch.randint(0, 256, (3 * CONTEXT,), generator=torch.Generator().manual_seed(0)).tolist()
    ids = generate_ids(model, prompt, max_tokens=1, temperature=0.0)
    assert ids == generate_ids(model, prompt[-(CONTEXT - 1) :], max_tokens=1, temperature=0.0)
    assert ids == greedy_by_full_forward(model, prompt[-(CONTEXT - 1) :], 1)


def test_truncation_keeps_the_end_of_the_prompt(cycle, tok):
    # the last prompt token decides the bigram model's next one: 'a' after '€', 'b' after 'a'
    prompt = [ord("a")] * (2 * CONTEXT) + [0xAC]
    assert generate_ids(cycle, prompt, max_tokens=1, temperature=0.0) == [ord("a")]
    text = generate_text(cycle, tok, "a" * 200 + "€", SamplingParams(max_tokens=2, temperature=0.0))
    assert text == "ab"


@pytest.mark.parametrize("prompt_len", [1, 10, CONTEXT - 1, CONTEXT, 2 * CONTEXT])
def test_generation_stops_when_the_context_is_full(model, prompt_len):
    prompt = torch.randint(0, 256, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    ids = generate_ids(model, prompt, max_tokens=1000, temperature=0.0)
    kept = min(prompt_len, CONTEXT - 1)
    # every generated token was predicted from at most CONTEXT tokens, and the context was used up
    assert CONTEXT - kept <= len(ids) <= CONTEXT - kept + 1
    assert len(prompt[-kept:]) + len(ids) - 1 <= CONTEXT
    assert ids == greedy_by_full_forward(model, prompt[-kept:], len(ids))


def test_text_generation_with_long_prompt_and_many_tokens_does_not_crash(model, tok):
    text = generate_text(model, tok, "x" * 500, SamplingParams(max_tokens=500, temperature=1.0, seed=0))
    assert isinstance(text, str)


# -- stream_text ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [[], ["e"], ["ab", "\n"], ["<|"]])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_pieces_join_to_generate_text(model, tok, stop, seed):
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=seed, stop=stop)
    streamed = list(stream_text(model, tok, "The ", params))
    assert "".join(streamed) == generate_text(model, tok, "The ", params)
    assert all(streamed)  # no empty pieces


def _long_unstopped(model, tok, min_chars=40):
    for seed in range(50):
        params = SamplingParams(max_tokens=200, temperature=1.0, seed=seed)
        text = generate_text(model, tok, "Once", params)
        if len(text) >= min_chars:
            return seed, text
    raise AssertionError("no seed gave a long enough sample")


def test_stop_string_cuts_right_before_its_first_occurrence(model, tok):
    seed, full = _long_unstopped(model, tok)
    counts = Counter(c for c in full if c != "\ufffd")
    stop_char = counts.most_common(1)[0][0]
    two = full[len(full) // 2 : len(full) // 2 + 2]  # a two-character stop string from the middle
    for stop in ([stop_char], [two], [two, stop_char], ["never-appears"]):
        params = SamplingParams(max_tokens=200, temperature=1.0, seed=seed, stop=stop)
        got = generate_text(model, tok, "Once", params)
        cut = min((full.find(s) for s in stop if s in full), default=len(full))
        assert got == full[:cut], stop
        assert not any(s in got for s in stop)


def test_stop_strings_with_multibyte_characters(cycle, tok):
    # continuation of "ab" is "é€abé€ab..."
    cases = {
        ("€a",): "é",
        ("b",): "é€a",
        ("bé",): "é€a",  # spans the cycle boundary
        ("ab", "€"): "é",  # the earliest of several
        ("é",): "",
        ("€abé€",): "é",
        ("zzz",): CYCLE * 3,  # never appears: everything
    }
    for stop, want in cases.items():
        got = pieces(cycle, tok, "ab", max_tokens=21, temperature=1.0, seed=0, stop=list(stop))
        assert "".join(got) == want, stop
        assert not any("\ufffd" in p for p in got)


def test_pieces_never_split_a_character(cycle, tok):
    got = pieces(cycle, tok, "ab", max_tokens=28, temperature=0.0)
    assert "".join(got) == CYCLE * 4
    assert not any("\ufffd" in p for p in got)
    # without stop strings each character is streamed as soon as its last byte arrives
    assert got == list(CYCLE * 4)
    # with stop strings, text that could start one is held back, but the stream stays incremental
    held = pieces(cycle, tok, "ab", max_tokens=28, temperature=0.0, stop=["xyz"])
    assert "".join(held) == CYCLE * 4 and len(held) > 4
    assert not any("\ufffd" in p for p in held)


def test_four_byte_characters_stream_whole(tok):
    model = bigram_model(cycle_transitions("😀x."))  # F0 9F 98 80 78 2E
    got = pieces(model, tok, ".", max_tokens=12, temperature=0.0)
    assert "".join(got) == "😀x." * 2
    assert got == list("😀x." * 2)


def test_stop_string_before_an_incomplete_character_at_the_end():
    """A BPE token can end in the first byte of a multi-byte character ('a' + 0xC3 here). When generation
    ends right after such a token, the stop string before it must still be honoured."""
    bpe = Tokenizer.train_bpe(["aé aè aê aë " * 20], vocab_size=265, min_frequency=1)
    a_c3 = bpe.token_id("aÃ")  # 'a' followed by the first byte of é/è/ê/ë
    assert a_c3 is not None and bpe.decode([a_c3]) == "a\ufffd"
    space = bpe.encode(" ")[0]
    model = bigram_model({space: a_c3, a_c3: bpe.eot_id}, vocab=320)
    assert generate_ids(model, [space], max_tokens=2, temperature=0.0) == [a_c3, bpe.eot_id]
    for max_tokens in (1, 5):  # ends by max_tokens / by end-of-text
        got = pieces(model, bpe, " ", max_tokens=max_tokens, temperature=0.0, stop=["a"])
        assert "a" not in "".join(got), got
