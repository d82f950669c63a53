"""The pretraining loop: one process or many under torchrun (DDP), CPU or GPU.

    train(config, out)                fresh run into `out`
    train(config, out, resume=True)   continue from the newest checkpoint in `out`, exactly

A step = gradient accumulation over micro-batches until `tokens_per_step`, clip, AdamW. Around it:
periodic evaluation and checkpoints, early stopping, a non-finite-loss guard, and SIGINT/SIGTERM,
which finish the current step, save a checkpoint and return. Everything a stage after training needs
lands in `out/final` (a model directory).
"""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from commonlm.config import RunConfig, config_from_dict, read_yaml
from commonlm.data.loader import TokenData, TrainBatches
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.evaluate.evaluate import evaluate
from commonlm.model.decoder import Decoder
from commonlm.model.loss import lm_loss
from commonlm.modeldir import load_model_dir, save_model_dir
from commonlm.runtime import autocast, pick_device, pick_dtype
from commonlm.train import checkpoint as ckpt
from commonlm.train.metrics import Metrics, measure_peak_flops, plot_losses
from commonlm.train.optim import lr_at, make_optimizer
from commonlm.utils import console, human
from commonlm.world import World, all_reduce_sum, barrier, close_world, init_world


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None
    step: int
    stopped_because: str  # "max_steps" | "max_time" | "patience" | "signal" | "stop_at_step"
    last_loss: float
    val: dict[str, float] | None
    model: Decoder  # this process's trained model (every rank's is identical under DDP)
    stop_signal: int | None = None  # the signal that stopped this process, when stopped_because == "signal"

    @property
    def exit_status(self) -> int:
        """What the CLI exits with: 0, or 128 + the signal (130 for SIGINT, 143 for SIGTERM), as a shell reports a
        process killed by it, so that scripts can tell a run that was stopped (and saved) from one that finished."""
        if self.stopped_because != "signal":
            return 0
        return 128 + (self.stop_signal or signal.SIGINT)  # under DDP the signal may have reached another rank only


class _StopSignal:
    """Turns the first SIGINT/SIGTERM into a polite stop request; a second one interrupts for real."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        console.print(f"\n[yellow]{signal.Signals(signum).name}: finishing this step, saving a checkpoint…[/]")

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def resolve_vocab(config: RunConfig, tokenizer: Tokenizer) -> None:
    """Model vocab = tokenizer vocab rounded up to a multiple of 64 (faster matmuls), unless set."""
    if config.model.vocab_size == 0:
        config.model.vocab_size = 64 * math.ceil(tokenizer.vocab_size / 64)
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise UserError(
            f"config: model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens; set it to 0 (automatic) or at least {tokenizer.vocab_size}"
        )


def grad_accum_steps(config: RunConfig, world: World) -> int:
    per_micro = config.train.micro_batch_size * seq_len_of(config) * world.size
    if not config.train.tokens_per_step:
        return 1
    return max(1, round(config.train.tokens_per_step / per_micro))


def seq_len_of(config: RunConfig) -> int:
    return config.train.seq_len or config.model.max_seq_len


def train(
    config: RunConfig,
    out: str | Path,
    resume: bool = False,
    init: str | Path | None = None,
    stop_at_step: int | None = None,
) -> TrainResult:
    """Train `config` into the run directory `out`. See the module docstring."""
    out = Path(out)
    cfg = config.train
    device = pick_device(cfg.device)
    world = init_world(device.type)
    try:
        if world.distributed and device.type == "cuda":
            device = torch.device("cuda", world.local_rank)
        return _train(config, out, resume, init, stop_at_step, device, world)
    finally:
        close_world(world)


def _train(config, out, resume, init, stop_at_step, device, world) -> TrainResult:
    cfg = config.train
    threads = cfg.threads or (max(1, (os.cpu_count() or 1) // world.size) if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # -- data and tokenizer ------------------------------------------------------------------------
    if not config.data.path:
        raise UserError("no training data: pass --data DIR (made by `commonlm data prepare`)")
    data = TokenData(config.data.path)
    tokenizer = Tokenizer.load(data.path)
    data.check_tokenizer(tokenizer)
    seq_len = seq_len_of(config)

    # -- run directory -----------------------------------------------------------------------------
    latest = ckpt.latest_checkpoint(out) if resume else None
    if resume and latest is None:
        raise UserError(f"--resume: no checkpoint in {out}/checkpoints; start a fresh run without --resume")
    if latest is not None and Tokenizer.load(latest).hash != tokenizer.hash:  # say, --data pointed elsewhere
        raise UserError(f"--resume {out}: the data in {data.path} was prepared with another tokenizer than the run's; "
                        f"resume on the run's own data, or prepare this text again with --tokenizer {latest}")
    if not resume and (ckpt.latest_checkpoint(out) or (out / "final").exists()):
        raise UserError(f"{out} already holds a run; continue it with --resume, or choose another --out")

    # -- model -------------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    if init is not None:
        from commonlm.api import resolve_model_path

        init = resolve_model_path(init)  # a model directory, or a run (its final/ model or newest checkpoint)
        model, init_tok, _ = load_model_dir(init)
        if init_tok.hash != tokenizer.hash:
            raise UserError(f"--init {init}: its tokenizer differs from the data's; prepare the data with {init}")
        config.model = model.config
    else:
        resolve_vocab(config, tokenizer)
        model = Decoder(config.model)
    config.validate()
    model.to(device)
    model.activation_checkpointing = cfg.activation_checkpointing
    optimizer = make_optimizer(model, cfg, device)
    batches = TrainBatches(data, seq_len, cfg.micro_batch_size, seed=cfg.seed, rank=world.rank, world=world.size)
    state: dict[str, Any] = {"step": 0, "tokens": 0, "best_val_loss": None, "evals_since_best": 0,
                             "nonfinite_streak": 0, "data": batches.state_dict(), "elapsed": 0.0}
    if latest is not None:
        saved, _, _ = load_model_dir(latest, device=device)
        model.load_state_dict(saved.state_dict())
        state = ckpt.load_training_state(latest, optimizer, device)
        batches.load_state_dict(state["data"])
    elif world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "commonlm.yaml")
    if world.is_main:
        ckpt.clean_partial(out)

    raw_model = model
    if world.distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    dtype = pick_dtype(cfg.dtype, device)
    accum = grad_accum_steps(config, world)
    tokens_per_step = accum * cfg.micro_batch_size * seq_len * world.size
    flops_per_step = raw_model.flops_per_token(seq_len) * tokens_per_step
    peak = measure_peak_flops(device, dtype) * world.size
    metrics = Metrics(out, cfg.max_steps, state["step"], enabled=world.is_main)
    if world.is_main:
        _print_summary(raw_model, config, device, dtype, world, accum, tokens_per_step, data, peak, latest)
        if not data.has_split("val"):
            console.print(f"[yellow]warning: {data.path} has no validation split, so this run measures no validation "
                          "loss and cannot stop early; prepare the data with --val-fraction 0.01 for one[/]",
                          soft_wrap=True)

    def run_eval(step: int) -> dict[str, float] | None:
        if not data.has_split("val"):
            return None
        result = evaluate(model, data, seq_len, cfg.micro_batch_size, cfg.eval_tokens, device=device,
                          dtype=dtype, world=world)
        values = result.as_dict()
        metrics.log({"step": step, **values},
                    f"step {step}: val loss {result.loss:.4f} · ppl {result.perplexity:.2f} · "
                    f"bpb {result.bits_per_byte:.4f}")
        return values

    def save(step_state: dict[str, Any]) -> Path | None:
        path = None
        if world.is_main:
            path = ckpt.save_checkpoint(out, raw_model, optimizer, tokenizer, config, step_state, cfg.keep_last)
        barrier(world)
        return path

    # -- the loop ----------------------------------------------------------------------------------
    stopped = "max_steps"
    last_loss = float("nan")
    val = None
    if latest is None and cfg.eval_every:
        val = run_eval(0)
    model.train()
    t_start, t_log, tokens_at_log = time.perf_counter(), time.perf_counter(), state["tokens"]
    elapsed_before = state["elapsed"]
    with _StopSignal() as stop_signal:
        while state["step"] < cfg.max_steps:
            step = state["step"]
            used = elapsed_before + time.perf_counter() - t_start
            lr = lr_at(step, cfg, used / cfg.max_time if cfg.max_time else 0.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                x, y = batches.next()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                last = micro == accum - 1
                # DDP: all-reduce gradients only after the last micro-batch
                ctx = model.no_sync() if world.distributed and not last and hasattr(model, "no_sync") else nullcontext()
                with ctx:
                    with autocast(device, dtype):
                        logits, _ = model(x)
                        loss = lm_loss(logits, y)
                    (loss / accum).backward()
                loss_sum += loss.detach()
            # one small all-reduce carries the mean loss and everybody's stop request
            flags = torch.stack([loss_sum / accum, torch.tensor(float(stop_signal.requested), device=device)])
            flags = all_reduce_sum(flags.float(), world)
            loss_value = flags[0].item() / world.size
            stop_requested = flags[1].item() > 0

            if not math.isfinite(loss_value):
                optimizer.zero_grad(set_to_none=True)
                state["nonfinite_streak"] += 1
                msg = f"non-finite loss ({loss_value}) at step {step}"
                if cfg.nonfinite == "stop" or state["nonfinite_streak"] >= cfg.max_nonfinite:
                    metrics.close()
                    raise UserError(
                        f"{msg}: training stopped. Lower train.lr, raise train.warmup_steps or use "
                        f"train.dtype=fp32; the last good checkpoint is in {out}/checkpoints"
                    )
                metrics.note(f"[yellow]{msg}: step skipped ({state['nonfinite_streak']} in a row)[/]")
                state["step"] += 1  # the schedule moves on; the data position already has
                state["data"] = batches.state_dict()
                continue
            state["nonfinite_streak"] = 0
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["tokens"] += tokens_per_step
            state["data"] = batches.state_dict()
            last_loss = loss_value
            step = state["step"]

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                now = time.perf_counter()
                tok_s = (state["tokens"] - tokens_at_log) / max(now - t_log, 1e-9)
                mfu = tok_s / tokens_per_step * flops_per_step / peak
                t_log, tokens_at_log = now, state["tokens"]
                record = {"step": step, "loss": loss_value, "lr": lr, "tokens": state["tokens"],
                          "tok_per_s": round(tok_s, 1), "mfu": round(mfu, 4)}
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                where = f"step {step}/{cfg.max_steps}"
                if cfg.max_time:
                    where = f"step {step} · {used:.0f}/{cfg.max_time:.0f}s"
                metrics.log(record, f"{where} · loss {loss_value:.4f} · lr {lr:.2e} · "
                                    f"{human(tok_s)} tok/s · MFU {100 * mfu:.1f}%")

            state["elapsed"] = elapsed_before + time.perf_counter() - t_start
            stop = None
            # a stop request skips a pending evaluation (minutes on a large split): save and leave at once
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps and not stop_requested:
                val = run_eval(step)
                if val is not None and cfg.patience:
                    best = state["best_val_loss"]
                    if best is None or val["val_loss"] < best:
                        state["best_val_loss"], state["evals_since_best"] = val["val_loss"], 0
                    else:
                        state["evals_since_best"] += 1
                        if state["evals_since_best"] >= cfg.patience:
                            stop = "patience"
            if stop_requested:
                stop = "signal"
            elif cfg.max_time and state["elapsed"] >= cfg.max_time:
                stop = "max_time"
            elif stop_at_step is not None and step >= stop_at_step:
                stop = "stop_at_step"
            if stop or (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.max_steps:
                save(state)
            if stop:
                stopped = stop
                break

    final_dir = None
    if stopped in ("max_steps", "patience", "max_time"):
        val = run_eval(state["step"]) or val
        if world.is_main:
            final_dir = save_model_dir(out / "final", raw_model, tokenizer, config)
        barrier(world)
    metrics.close()
    if world.is_main:
        plot_losses(out)
        where = f"model in {final_dir}" if final_dir else f"resume with: commonlm train --resume {out}"
        console.print(f"[bold green]stopped[/] at step {state['step']} ({stopped}); {where}")
    return TrainResult(out, final_dir, state["step"], stopped, last_loss, val, raw_model, stop_signal.signum)


def _print_summary(model, config, device, dtype, world, accum, tokens_per_step, data, peak, latest) -> None:
    c, t = config.model, config.train
    lines = [
        f"model    {c.family}-style · {human(model.num_params())} params "
        f"({human(model.num_params(exclude_embeddings=True))} without embeddings) · "
        f"{c.n_layer} layers · d_model {c.d_model} · {c.n_head} heads ({c.kv_heads} kv) · vocab {c.vocab_size} · "
        f"{human(model.flops_per_token(seq_len_of(config)))}FLOP/token (train)",
        f"data     {data.path} · train {human(data.tokens('train'))} tokens"
        + (f" · val {human(data.tokens('val'))} tokens" if data.has_split("val") else " · no val split"),
        f"step     {human(tokens_per_step)} tokens = {t.micro_batch_size} seqs × {seq_len_of(config)} tokens × "
        f"{accum} accum × {world.size} procs · {t.max_steps} steps"
        + (f" or {t.max_time:g}s" if t.max_time else "") + f" · lr {t.lr:g} ({t.schedule})",
        f"device   {device} · {str(dtype).replace('torch.', '')} · {world.size} process(es) · "
        f"{torch.get_num_threads() if device.type == 'cpu' else ''}{' threads · ' if device.type == 'cpu' else ''}"
        f"peak {human(peak)}FLOP/s measured",
    ]
    if latest is not None:
        lines.append(f"resume   from {latest}")
    console.print("\n".join(lines))


def resume_config(run_dir: str | Path) -> RunConfig:
    """The config a run was started with (for `commonlm train --resume`)."""
    path = Path(run_dir) / "commonlm.yaml"
    if not path.is_file():
        raise UserError(f"--resume: {run_dir} has no commonlm.yaml; is it a run directory?")
    return config_from_dict(read_yaml(path))
