"""The Python API: what the CLI does, for notebooks and scripts.

    from commonlm import load, load_config, pretrain
    m = load("runs/x")                     # a run directory, its final/ model, or any checkpoint
    m = load("base/", adapter="runs/lora") # a LoRA adapter (a run's, or one PEFT saved) merged into a model
    print(m.generate("def ", max_tokens=50))
    print(m.chat([{"role": "user", "content": "hello"}], max_tokens=50))
    result = pretrain(load_config("tiny", ["train.max_steps=100"]), data="data/", out="runs/y")
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from commonlm.config import RunConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.infer.chat import fit_conversation
from commonlm.infer.generate import SamplingParams, stream_text
from commonlm.model.decoder import Decoder
from commonlm.modeldir import is_model_dir, load_model_dir
from commonlm.runtime import pick_device


def resolve_model_path(path: str | Path) -> Path:
    """A model (or adapter) directory itself, a run's `final/`, or else the run's newest checkpoint."""
    path = Path(path)
    if is_model_dir(path):
        return path
    if (path / "final").is_dir():
        return path / "final"
    from commonlm.train.checkpoint import latest_checkpoint

    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    if not path.exists():
        raise UserError(f"{path}: no such directory (give a run directory or a model directory)")
    raise UserError(f"{path}: no model here (no final/ model, no checkpoint); train one with `commonlm train`")


class LanguageModel:
    """A loaded model with its tokenizer and config, ready to sample or evaluate."""

    def __init__(self, model: Decoder, tokenizer: Tokenizer, config: RunConfig, path: Path):
        self.model, self.tokenizer, self.config, self.path = model.eval(), tokenizer, config, path

    def stream(self, prompt: str, compile: bool = False, **sampling) -> Iterator[str]:
        """Text pieces as they are generated (see SamplingParams for the keyword arguments).

        compile=True decodes through a compiled step: seconds to compile once, faster tokens after."""
        return stream_text(self.model, self.tokenizer, prompt, SamplingParams(**sampling), compile=compile)

    def generate(self, prompt: str, compile: bool = False, **sampling) -> str:
        return "".join(self.stream(prompt, compile=compile, **sampling))

    def stream_chat(self, messages: list[dict[str, str]], compile: bool = False, **sampling) -> Iterator[str]:
        """The assistant's reply to `messages` ([{"role": "user", "content": ...}, ...]) as it is generated.
        Message text is plain text (it can never forge a turn); the oldest turns are left out when the
        conversation no longer fits the context (a system prompt stays)."""
        params = SamplingParams(**sampling)
        fitted = fit_conversation(self.tokenizer, messages, self.model.config.max_seq_len, params.max_tokens)
        params.max_tokens = fitted.max_tokens
        return stream_text(self.model, self.tokenizer, fitted.ids, params, compile=compile)

    def chat(self, messages: list[dict[str, str]], compile: bool = False, **sampling) -> str:
        return "".join(self.stream_chat(messages, compile=compile, **sampling))

    def evaluate(self, data: str | Path, split: str = "val", max_tokens: int = 0, batch_size: int = 16):
        from commonlm.data.loader import TokenData
        from commonlm.evaluate.evaluate import evaluate

        tokens = TokenData(data)
        tokens.check_tokenizer(self.tokenizer)
        device = self.model.embed.weight.device
        return evaluate(self.model, tokens, self.model.config.max_seq_len, batch_size, max_tokens,
                        split=split, device=device)

    def evaluate_tasks(self, tasks, few_shot: int | None = None, limit: int | None = None, batch_size: int = 16,
                       data_root: str | Path | None = None) -> list:
        """Downstream tasks (evaluate/tasks.py): `Task`s, task files, BIG-bench task.json, or mmlu, gsm8k,
        bigbench:NAME; a list of evaluate.scoring.TaskResult."""
        from commonlm.evaluate.scoring import score_tasks
        from commonlm.evaluate.tasks import load_tasks

        tasks = [tasks] if isinstance(tasks, (str, Path)) else tasks
        loaded = [t for spec in tasks for t in (load_tasks(str(spec), data_root) if isinstance(spec, (str, Path))
                                                else [spec])]
        return score_tasks(self.model, self.tokenizer, loaded, few_shot, limit, batch_size)

    def __repr__(self) -> str:
        c = self.model.config
        return f"LanguageModel({self.path}, {c.family}, {self.model.num_params():,} params)"


def load(path: str | Path, device: str = "auto", adapter: str | Path | None = None) -> LanguageModel:
    """A model directory, run or checkpoint (a LoRA run's: its base with the adapter merged in); with `adapter`,
    a LoRA adapter directory (ours or PEFT's) merged into that model."""
    where = resolve_model_path(path)
    model, tokenizer, config = load_model_dir(where, device=pick_device(device))
    if adapter is not None:
        from commonlm.tune.lora import apply_adapter, is_adapter_dir, merge_lora

        adapter = adapter if is_adapter_dir(adapter) else resolve_model_path(adapter)  # or a LoRA run
        merge_lora(apply_adapter(model, adapter, tokenizer))  # merged: decoding costs what the base's does
    return LanguageModel(model, tokenizer, config, where)


def pretrain(config: RunConfig, data: str | Path, out: str | Path, resume: bool = False, **kwargs):
    """Train `config` on prepared `data` into the run directory `out` (see train/trainer.py)."""
    from commonlm.train.trainer import train as _train

    config.data.path = str(data)
    return _train(config.validate(), out, resume=resume, **kwargs)


__all__ = ["LanguageModel", "load", "pretrain", "resolve_model_path"]
