"""LoRA and QLoRA as settings of the one loop: only the adapters train, checkpoints hold the adapters only and
resume exactly, final/ is a PEFT adapter directory that our loaders, `commonlm merge`, `--adapter` and PEFT
itself all read, and what an adapter directory cannot say is refused in one line."""

import json
import random

import pytest
import torch

from commonlm.api import load
from commonlm.errors import UserError
from commonlm.infer.quant import Int4DequantLinear, Int8Linear
from commonlm.modeldir import load_model_dir
from commonlm.train.metrics import peak_flops, read_metrics
from commonlm.train.trainer import resume_config, train
from commonlm.tune.lora import LoRALinear, apply_adapter, lora_modules
from commonlm.tune.sft import sft_config
from tests.tune.conftest import base_and_data as make_base_and_data

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["train.dtype=fp32", "train.threads=1", "train.log_every=1", "train.micro_batch_size=4",
         "train.eval_every=0", "train.lr=1e-2", "train.warmup_steps=2"]
LORA = ["train.lora_rank=4", "train.lora_alpha=8", "train.lora_dropout=0.1"]


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append({"messages": [{"role": "user", "content": f"{a}+{b}"},
                                 {"role": "assistant", "content": f"{a}+{b}={a + b}"}]})
    return out


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory):
    return make_base_and_data(tmp_path_factory.mktemp("lora"), conversations(60), val_fraction=0.1)


@pytest.fixture(scope="module")
def lora_run(base_and_data, tmp_path_factory):
    """A 12-step LoRA SFT run with a checkpoint every 4 steps."""
    base, chat = base_and_data
    # measuring the matmul peak draws from torch's global generator (train/metrics.py), after the adapters and
    # before the first dropout mask: measured once here, every run of this module starts from the same draws
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as train.threads=1 runs (the peak is remembered per thread count)
    peak_flops(torch.device("cpu"), torch.float32)
    torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("run") / "run"
    config = sft_config(str(base), str(chat), SMALL + LORA + ["train.max_steps=12", "train.ckpt_every=4"])
    return train(config, out, init=base)


@pytest.fixture(autouse=True)
def grad_mode():
    """`commonlm generate` run in this process turns autograd off for good (cli.py's _inference_model)."""
    yield
    torch.set_grad_enabled(True)


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def _idx() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def test_lora_run_trains_only_adapters_into_small_checkpoints(lora_run, base_and_data):
    base, _ = base_and_data
    losses = _losses(lora_run.run_dir)
    assert losses[-1] < losses[0] - 0.3, losses
    fresh, _, _ = load_model_dir(base)
    trained = {k.replace(".base.", "."): v for k, v in lora_run.model.state_dict().items() if ".lora_" not in k}
    assert set(trained) == set(fresh.state_dict())
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(trained[name], tensor), name  # the base, bit for bit
    assert any(b.abs().sum() > 0 for m in lora_modules(lora_run.model).values() for b in m.lora_B.values())

    base_bytes = (base / "model.safetensors").stat().st_size
    for where in (*sorted((lora_run.run_dir / "checkpoints").iterdir()), lora_run.final_dir):
        files = {p.name for p in where.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "commonlm.yaml",
                "generation_config.json"} <= files, where
        assert not files & {"model.safetensors", "config.json"}, where  # no copy of the base
        assert (where / "adapter_model.safetensors").stat().st_size < base_bytes / 5
        config = json.loads((where / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(base.resolve()) and config["r"] == 4
    assert {"optimizer.pt", "trainer_state.json", "rng.pt"} <= {p.name for p in (lora_run.run_dir / "checkpoints"
                                                                               / "step_000012").iterdir()}


def test_lora_resume_is_exact(lora_run, base_and_data, tmp_path):
    base, chat = base_and_data
    config = sft_config(str(base), str(chat), SMALL + LORA + ["train.max_steps=12", "train.ckpt_every=4"])
    train(config, tmp_path / "split", init=base, stop_at_step=5)
    resumed = train(resume_config(tmp_path / "split"), tmp_path / "split", resume=True)
    assert resumed.step == 12
    assert _losses(tmp_path / "split") == _losses(lora_run.run_dir)  # value for value, dropout included
    ours = load_model_dir(resumed.final_dir)[0].state_dict()
    for name, tensor in load_model_dir(lora_run.final_dir)[0].state_dict().items():
        assert torch.equal(ours[name], tensor), name


def test_final_loads_merged_and_generates(lora_run):
    with torch.no_grad():
        trained, _ = lora_run.model.eval()(_idx())
    for path in (lora_run.run_dir, lora_run.final_dir):
        lm = load(path, device="cpu")
        assert not lora_modules(lm.model)  # merged into the base: a plain decoder
        with torch.no_grad():
            logits, _ = lm.model(_idx())
        assert (logits - trained).abs().max().item() < 1e-4
    text = lm.generate("3+4", max_tokens=8, temperature=0.0)
    assert isinstance(text, str) and text


def test_peft_loads_the_runs_adapter_on_the_exported_base(lora_run, base_and_data):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base, _ = base_and_data
    theirs = transformers.AutoModelForCausalLM.from_pretrained(base)
    theirs = peft.PeftModel.from_pretrained(theirs, lora_run.final_dir).eval()
    with torch.no_grad():
        ref = theirs(_idx()).logits
        ours, _ = load(lora_run.final_dir, device="cpu").model(_idx())
        plain, _ = load(base, device="cpu").model(_idx())
    assert (ours - plain).abs().max().item() > 1e-3  # the adapter matters
    assert (ours - ref).abs().max().item() < 1e-4


def test_an_adapter_peft_saved_applies(base_and_data, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base, _ = base_and_data
    torch.manual_seed(5)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj", "o_proj", "up_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(theirs, config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        ref = theirs(_idx()).logits
        ours, _ = load(base, device="cpu", adapter=tmp_path / "peft").model(_idx())
    assert (ours - ref).abs().max().item() < 1e-4
    # unmerged, it is the same adapter: only k's rows of the fused qkv carry one
    model = apply_adapter(load_model_dir(base)[0], tmp_path / "peft")
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, LoRALinear) and set(qkv.lora_B) == {"k_proj"} and qkv.parts[
        "model.layers.0.self_attn.k_proj"] == (64, 128)


def test_merge_writes_base_plus_scaled_ba(lora_run, base_and_data, tmp_path):
    from commonlm.cli import main

    base, _ = base_and_data
    assert main(["merge", str(lora_run.final_dir), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged, _, config = load_model_dir(tmp_path / "merged")
    assert config.train.lora_rank == 0
    w0 = load_model_dir(base)[0].state_dict()
    w = merged.state_dict()
    qkv = lora_run.model.blocks[1].attn.qkv
    for target, (start, stop) in qkv.parts.items():
        k = qkv.keys[target]
        expect = w0["blocks.1.attn.qkv.weight"][start:stop] + 2.0 * qkv.lora_B[k] @ qkv.lora_A[k]  # alpha/r = 8/4
        assert torch.allclose(w["blocks.1.attn.qkv.weight"][start:stop], expect, atol=1e-6), target
    assert torch.equal(w["blocks.1.norm1.weight"], w0["blocks.1.norm1.weight"])
    # an existing --out is refused without --overwrite, replaced with it
    assert main(["merge", str(lora_run.final_dir), "--out", str(tmp_path / "merged")]) == 2
    assert main(["merge", str(lora_run.run_dir), "--base", str(base), "--out", str(tmp_path / "merged"),
                 "--overwrite"]) == 0


def test_generate_with_adapter_flag(lora_run, base_and_data, capsys):
    from commonlm.cli import main

    base, _ = base_and_data
    args = ["--prompt", "2+5", "--max-tokens", "12", "--temperature", "0", "--dtype", "fp32", "--device", "cpu"]
    outputs = []
    for model in (["generate", str(base), "--adapter", str(lora_run.final_dir)], ["generate", str(lora_run.run_dir)],
                  ["generate", str(base)]):
        assert main(model + args) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]  # base + --adapter is the run's own model
    assert outputs[0] != outputs[2]  # and not the base


def test_bf16_run_keeps_the_frozen_base_as_autocast_would_make_it(base_and_data, tmp_path):
    """Under bf16 autocast the frozen linears are stored in bf16: the numbers autocast makes of fp32 ones at every
    call, so the first step's loss (the adapters start as a no-op) is that of full fine-tuning, bit for bit."""
    base, chat = base_and_data
    bf16 = [s for s in SMALL if "dtype" not in s] + ["train.dtype=bf16", "train.max_steps=1"]
    lora = train(sft_config(str(base), str(chat), bf16 + LORA[:2]), tmp_path / "lora", init=base)
    train(sft_config(str(base), str(chat), bf16), tmp_path / "full", init=base)
    assert _losses(tmp_path / "lora") == _losses(tmp_path / "full")
    adapted = lora_modules(lora.model)["blocks.0.attn.qkv"]
    assert adapted.base.weight.dtype == torch.bfloat16 and adapted.lora_A["q_proj"].dtype == torch.float32
    assert lora.model.embed.weight.dtype == torch.float32


@pytest.mark.parametrize("mode,kind", [("int8", Int8Linear), ("int4", Int4DequantLinear)])
def test_qlora_trains_on_an_unchanged_quantized_base(base_and_data, tmp_path, mode, kind):
    base, chat = base_and_data
    config = sft_config(str(base), str(chat), SMALL + LORA + ["train.max_steps=8", f"train.base_quant={mode}"])
    result = train(config, tmp_path / "run", init=base)
    losses = _losses(tmp_path / "run")
    assert losses[-1] < losses[0] - 0.3, losses
    quantized = [m for m in result.model.modules() if isinstance(m, kind)]
    assert len(quantized) == 2 * 4  # qkv, attn.proj, gate_up, mlp.proj of 2 blocks (inside their adapters)
    from commonlm.tune.lora import quantize_base

    again = quantize_base(load_model_dir(base)[0], mode)  # the same quantization of the same base
    buffers = {k.replace(".base.", "."): v for k, v in result.model.state_dict().items() if ".lora_" not in k}
    for name, tensor in again.state_dict().items():
        assert torch.equal(buffers[name], tensor), name  # untouched by training
    assert not result.model.lm_head.weight.requires_grad and result.model.lm_head.weight.dtype == torch.float32
    # final/ is an adapter directory like any other: for inference it goes on the float base, merged
    lm = load(result.final_dir, device="cpu")
    with torch.no_grad():
        ours, _ = lm.model(_idx())
        plain, _ = load(base, device="cpu").model(_idx())
    assert (ours - plain).abs().max().item() > 1e-3
    assert isinstance(lm.generate("1+1", max_tokens=4, temperature=0.0), str)


def test_bad_settings_are_one_line_errors(base_and_data, lora_run, tmp_path):
    base, chat = base_and_data
    with pytest.raises(UserError, match="does not exist"):
        train(sft_config(str(base), str(chat), SMALL + LORA + ["train.init=/nowhere/base"]), tmp_path / "a")
    with pytest.raises(UserError, match="train.base_quant"):
        sft_config(str(base), str(chat), SMALL + ["train.base_quant=int8"])
    with pytest.raises(UserError, match="c_fc"):
        train(sft_config(str(base), str(chat), SMALL + LORA + ["train.lora_targets=c_fc"]), tmp_path / "b", init=base)

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (adapter / f).write_bytes((lora_run.final_dir / f).read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    for key, value in [("use_dora", True), ("rank_pattern", {"q_proj": 8}), ("bias", "all"),
                       ("modules_to_save", ["lm_head"])]:
        (adapter / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(UserError, match=key) as e:
            load(base, device="cpu", adapter=adapter)
        assert "\n" not in str(e.value)
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(UserError, match="--base"):
        load_model_dir(adapter)

    from commonlm.config import ModelConfig, RunConfig
    from commonlm.data.tokenizer import Tokenizer
    from commonlm.model.decoder import Decoder
    from commonlm.modeldir import save_model_dir

    other = RunConfig(model=ModelConfig(family="llama", n_layer=2, n_head=4, d_model=32, vocab_size=320,
                                        max_seq_len=64))
    save_model_dir(tmp_path / "other", Decoder(other.model), Tokenizer.byte_level(), other)
    with pytest.raises(UserError, match="another"):  # a base of another shape
        load(tmp_path / "other", device="cpu", adapter=lora_run.final_dir)
    with pytest.raises(UserError, match="another model than this one"):
        from commonlm.tune.lora import merge_adapter_dir

        merge_adapter_dir(lora_run.final_dir, tmp_path / "other", tmp_path / "m")


def test_tune_dpo_with_qlora_through_the_cli(tmp_path):
    from commonlm.cli import main

    rng = random.Random(1)
    records = []
    for _ in range(60):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        records.append({"prompt": f"{a}+{b}", "chosen": f"yes {a + b}", "rejected": f"no {a + b + 1}"})
    base, pref = make_base_and_data(tmp_path, records, val_fraction=0.2, preference=True)
    settings = [s for s in SMALL if "lr" not in s] + ["train.lr=2e-2", "train.max_steps=10", "train.ckpt_every=5"]
    status = main(["tune", "dpo", "--init", str(base), "--data", str(pref), "--out", str(tmp_path / "run"),
                   "--lora-rank", "4", "--quantize-base", "int8", "--set", *settings])
    assert status == 0
    losses = _losses(tmp_path / "run")
    assert abs(losses[0] - 0.6931) < 0.01 and losses[-1] < losses[0] - 0.05, losses  # log 2: policy = reference
    config = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    assert not (tmp_path / "run" / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_lora_under_ddp_matches_one_process_and_resumes_exactly(base_and_data, tmp_path):
    import textwrap

    from tests.procs import torchrun

    base, chat = base_and_data
    overrides = SMALL + LORA[:2] + ["train.max_steps=4", "train.ckpt_every=2", "train.micro_batch_size=2"]
    script = tmp_path / "ddp_lora.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from commonlm.train.trainer import resume_config, train
        from commonlm.tune.sft import sft_config
        out, stop = sys.argv[1], int(sys.argv[2])
        if stop < 0:
            train(resume_config(out), out, resume=True)
        else:
            train(sft_config({str(base)!r}, {str(chat)!r}, {overrides!r}), out, init={str(base)!r},
                  stop_at_step=stop or None)
    """))
    # an uninterrupted run, a run stopped after step 2, its resumption: each its own torchrun
    for out, stop in [("ddp", 0), ("split", 2), ("split", -1)]:
        proc = torchrun(script, tmp_path / out, stop)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # one process, twice the micro-batch: the same conversations per step, the same adapters after
    single = train(sft_config(str(base), str(chat), overrides + ["train.micro_batch_size=4"]), tmp_path / "single",
                   init=base)
    ddp, one = _losses(tmp_path / "ddp"), _losses(tmp_path / "single")
    assert len(ddp) == 4 and max(abs(a - b) for a, b in zip(ddp, one)) < 1e-4, (ddp, one)
    assert _losses(tmp_path / "split") == ddp
    trained = load_model_dir(tmp_path / "ddp" / "final")[0].state_dict()
    for name, tensor in load_model_dir(single.final_dir)[0].state_dict().items():
        assert torch.allclose(trained[name], tensor, atol=1e-5), name


def test_grpo_with_lora_samples_from_the_adapted_model_and_resumes_exactly(base_and_data, tmp_path):
    from commonlm.data.arithmetic import problems, prompt_records
    from commonlm.data.prompts import prepare_prompts
    from commonlm.tune.grpo import grpo_config
    from commonlm.utils import write_jsonl

    base, _ = base_and_data
    path = write_jsonl(tmp_path / "prompts.jsonl", prompt_records(problems(40, seed=2, digits=1)))
    prepare_prompts([str(path)], base, tmp_path / "prompts", val_fraction=0.0)
    reward = tmp_path / "reward.py"  # a reward with spread even for a random model: the share of digits
    reward.write_text("def digits(completion, answer, prompt):\n"
                      "    return sum(c.isdigit() for c in completion) / max(len(completion), 1)\n")
    overrides = ["train.dtype=fp32", "train.threads=1", "train.log_every=1", "train.eval_every=0",
                 f"train.reward={reward}:digits", "train.grpo_max_new_tokens=4", "train.grpo_group_size=4",
                 "train.micro_batch_size=8", "train.lr=1e-2", "train.max_steps=4", "train.ckpt_every=2", *LORA]
    full = train(grpo_config(str(base), str(tmp_path / "prompts"), overrides), tmp_path / "full", init=base)
    assert (full.final_dir / "adapter_config.json").is_file()
    assert any(b.abs().sum() > 0 for m in lora_modules(full.model).values() for b in m.lora_B.values())
    train(grpo_config(str(base), str(tmp_path / "prompts"), overrides), tmp_path / "split", init=base, stop_at_step=2)
    train(resume_config(tmp_path / "split"), tmp_path / "split", resume=True)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full")
