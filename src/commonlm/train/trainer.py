"""The training loop, the one of every objective: one process or many under torchrun (DDP), CPU or GPU.

    train(config, out)                      pretraining (train/objective.py's NextToken) into `out`
    train(config, out, resume=True)         continue from the newest checkpoint in `out`, exactly
    train(config, out, objective=MyObjective)   the same loop for another objective (fine-tuning, ...)

Setup: build the model (on the meta device, then initialise or load it in place), parallelize it
(train/parallel.py: compile, DDP or FSDP), then its optimizer. A step = the objective's micro-batches until
`tokens_per_step`, each micro-batch's loss summed over its target tokens and divided by the target tokens
of the whole step (all micro-batches, all ranks), clip, AdamW. Around it: periodic evaluation and
checkpoints, early stopping (patience, or a target validation loss), a non-finite-loss guard, and
SIGINT/SIGTERM, which finish the current step, save a checkpoint and return. Loss, gradient norm and
skipped steps reach the host only at log steps (fused AdamW skips a non-finite step on the device).
Everything a stage after training needs lands in `out/final`.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from commonlm.config import RunConfig, config_from_dict, read_yaml
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.model.decoder import Decoder
from commonlm.model.moe import router_metrics
from commonlm.modeldir import load_model_dir, save_model_dir
from commonlm.runtime import pick_device, pick_dtype
from commonlm.scale.swarm import volunteer
from commonlm.threads import ThreadGovernor, available_cpus
from commonlm.train import checkpoint as ckpt
from commonlm.train.metrics import Metrics, environment, peak_flops, plot_losses, rated_peak_flops
from commonlm.train.objective import NextToken, Objective
from commonlm.train.optim import lr_at, make_optimizer
from commonlm.train.parallel import (
    accumulating,
    build_model,
    clip_grad_norm,
    full_state_dict,
    gathered,
    init_weights,
    parallelize,
)
from commonlm.utils import atomic_write_json, console, human
from commonlm.world import World, all_reduce_sum, barrier, close_world, init_world


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None
    step: int
    stopped_because: str  # "max_steps" | "max_time" | "patience" | "target_val_loss" | "signal" | "stop_at_step"
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


# How the loop gets its objective: a class (or function) taking the run's config, world, device and autocast
# dtype, and (keyword `model`) the model being trained, for an objective that samples from it (GRPO)
MakeObjective = Callable[..., Objective]


def objective_of(config: RunConfig) -> MakeObjective:
    """The objective `train.objective` names."""
    if config.train.objective == "sft":
        from commonlm.tune.sft import ChatSFT

        return ChatSFT
    if config.train.objective == "dpo":
        from commonlm.tune.dpo import DPO

        return DPO
    if config.train.objective == "grpo":
        from commonlm.tune.grpo import GRPO

        return GRPO
    return NextToken


def train(
    config: RunConfig,
    out: str | Path,
    resume: bool = False,
    init: str | Path | None = None,
    stop_at_step: int | None = None,
    objective: MakeObjective | None = None,
) -> TrainResult:
    """Train `config` into the run directory `out`. See the module docstring. The objective is
    `train.objective`'s (so that `--resume` continues with the same one) unless one is given here."""
    out = Path(out)
    cfg = config.train
    device = pick_device(cfg.device)
    world = init_world(device.type)
    try:
        if world.distributed and device.type == "cuda":
            device = torch.device("cuda", world.local_rank)
        return _train(config, out, resume, init, stop_at_step, device, world, objective or objective_of(config))
    finally:
        close_world(world)


def _train(config, out, resume, init, stop_at_step, device, world, make_objective) -> TrainResult:
    cfg = config.train
    governor = None  # train.threads=0 on CPU: the CPUs other processes leave free, re-checked (commonlm/threads.py)
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu":
        governor = ThreadGovernor(cap=max(1, available_cpus() // world.size))
        torch.set_num_threads(governor.cap)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # -- tokenizer and run directory ---------------------------------------------------------------
    if not config.data.path:
        raise UserError("no training data: pass --data DIR (made by `commonlm data prepare`)")
    if not (Path(config.data.path) / "index.json").is_file():
        raise UserError(f"data: {config.data.path} is not a prepared data directory (no index.json); create one "
                        "with `commonlm data prepare`")
    tokenizer = Tokenizer.load(config.data.path)
    resume = resume or (cfg.auto_resume and ckpt.latest_checkpoint(out) is not None)
    latest = ckpt.latest_checkpoint(out) if resume else None
    if resume and latest is None:
        raise UserError(f"--resume: no checkpoint in {out}/checkpoints; start a fresh run without --resume")
    if latest is not None and Tokenizer.load(latest).hash != tokenizer.hash:  # say, --data pointed elsewhere
        raise UserError(f"--resume {out}: the data in {config.data.path} was prepared with another tokenizer than "
                        f"the run's; resume on the run's own data, or prepare this text again with --tokenizer "
                        f"{latest}")
    if not resume and (ckpt.latest_checkpoint(out) or (out / "final").exists()):
        raise UserError(f"{out} already holds a run; continue it with --resume, or choose another --out")

    # -- model: build, place, parallelize; then its optimizer --------------------------------------
    if cfg.lora_rank:  # adapters on the frozen base train.init; a checkpoint holds the adapters only
        from commonlm.tune.lora import describe_lora, lora_model

        model = lora_model(config, tokenizer, device, init=init, adapter=latest)
        if world.is_main:
            console.print(describe_lora(model, config))
    elif latest is not None:
        model, _, _ = load_model_dir(latest, device=device)
    elif init is not None:
        from commonlm.api import resolve_model_path

        init = resolve_model_path(init)  # a model directory, or a run (its final/ model or newest checkpoint)
        model, init_tok, _ = load_model_dir(init, device=device)
        if init_tok.hash != tokenizer.hash:
            raise UserError(f"--init {init}: its tokenizer differs from the data's; prepare the data with {init}")
        from commonlm.train.extend import continued_model

        model = continued_model(model, config.model, init, device)  # --set model.max_seq_len=... (a longer context)
        config.model = model.config
    else:
        resolve_vocab(config, tokenizer)
        model = build_model(config, meta=True)
        init_weights(model, cfg.seed, device)  # the same weights on every rank
    config.validate()
    raw_model = model
    raw_model.activation_checkpointing = cfg.activation_checkpointing
    dtype = pick_dtype(cfg.dtype, device)
    model = parallelize(raw_model, config, world, device)
    optimizer = make_optimizer(raw_model, cfg, device)
    objective = make_objective(config, world, device, dtype, model=raw_model)
    state: dict[str, Any] = {"step": 0, "tokens": 0, "best_val_loss": None, "evals_since_best": 0,
                             "nonfinite_streak": 0, "data": objective.state_dict(), "elapsed": 0.0}
    if latest is not None:
        state = ckpt.load_training_state(latest, optimizer, device, model)
        objective.load_state_dict(state["data"])
    elif world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "commonlm.yaml")
    if world.is_main:
        ckpt.clean_partial(out)
        # where and with what code each start (the first, then every resume) ran: `commonlm report` shows it
        info = out / "run_info.json"
        starts = json.loads(info.read_text()) if latest is not None and info.is_file() else []
        starts.append({"step": state["step"], "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                       "processes": world.size, **environment()})
        atomic_write_json(info, starts)

    seq_len = seq_len_of(config)
    accum = grad_accum_steps(config, world)
    tokens_per_step = accum * cfg.micro_batch_size * seq_len * world.size  # at most; padded batches hold fewer
    flops_per_token = raw_model.flops_per_token(seq_len)
    if governor is not None:
        governor.update(force=True)  # the first look, over the setup above
    # MFU is against all the CPUs the run may use, however many threads it runs at the moment
    peak = peak_flops(device, dtype, threads=governor.cap if governor else 0,
                      remember=governor is None or governor.quiet) * world.size
    # a known GPU's rated bf16 peak as well: the figure other projects' MFU is against
    rated = rated_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    rated = rated * world.size if rated else None
    metrics = Metrics(out, cfg.max_steps, state["step"], enabled=world.is_main)
    if world.is_main:
        _print_summary(raw_model, config, device, dtype, world, accum, tokens_per_step, objective, peak, latest)

    def run_eval(step: int) -> dict[str, float] | None:
        with gathered(model):  # (a sharded model: ranks may evaluate unequal numbers of batches)
            values = objective.evaluate(model)
        if values is not None:
            formats = {"val_loss": ".4f", "val_ppl": ".2f", "val_bpb": ".4f"}
            shown = " · ".join(f"{k.removeprefix('val_')} {v:{formats.get(k, '.4g')}}" for k, v in values.items()
                               if k != "val_tokens")
            metrics.log({"step": step, **values}, f"step {step}: val {shown}")
        return values

    def save(step_state: dict[str, Any]) -> Path | None:
        path = None
        if cfg.parallel in ("fsdp", "hsdp"):  # every rank writes its shards (DCP), at any number of processes
            path = ckpt.save_sharded_checkpoint(out, model, optimizer, tokenizer, config, step_state, cfg.keep_last,
                                                world)
        elif world.is_main:  # (DDP: every rank holds the whole weights)
            path = ckpt.save_checkpoint(out, raw_model, optimizer, tokenizer, config, step_state, cfg.keep_last,
                                        weights=full_state_dict(model))
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
    # fused AdamW can skip a step on the device (it reads `found_inf`, as torch.amp's GradScaler sets it), so
    # finding a non-finite loss needs no host sync at every step; other optimizers are asked every step
    skips_on_device = bool(optimizer.defaults.get("fused"))
    skipped = torch.zeros((), device=device)  # non-finite steps since the host last looked
    streak = torch.full((), float(state["nonfinite_streak"]), device=device)
    # train.swarm: a DiLoCo volunteer, whose outer syncs happen inside optimizer.step() (scale/swarm.py)
    with _StopSignal() as stop_signal, volunteer(config, world, raw_model, optimizer, metrics, state["step"]):
        while state["step"] < cfg.max_steps:
            step = state["step"]
            used = elapsed_before + time.perf_counter() - t_start
            lr = lr_at(step, cfg, used / cfg.max_time if cfg.max_time else 0.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = [objective.next_batch() for _ in range(accum)]
            # every target token of the step weighs the same: divide by their number, over micro-batches and ranks
            targets = all_reduce_sum(sum(objective.targets(b) for b in micro_batches), world)
            loss_sum = torch.zeros((), device=device)
            extra: dict[str, torch.Tensor] = {}
            for micro, batch in enumerate(micro_batches):
                last = micro == accum - 1
                with nullcontext() if last or not world.distributed else accumulating(model):
                    total, parts = objective.loss(model, batch)
                    # DDP averages the gradients of the ranks; the step wants their sum over all targets
                    (total / targets if world.size == 1 else total * world.size / targets).backward()
                loss_sum += total.detach()
                for name, value in parts.items():
                    extra[name] = extra.get(name, 0) + value.detach()
            # one small all-reduce carries the summed loss, the metrics and everybody's stop request
            flags = torch.stack([loss_sum, torch.tensor(float(stop_signal.requested), device=device),
                                 *extra.values()]).float()
            flags = all_reduce_sum(flags, world)
            nonfinite = ~flags[0].isfinite()
            skipped += nonfinite
            streak = (streak + 1) * nonfinite
            if skips_on_device:  # the fused kernel leaves weights and moments alone when this is 1
                optimizer.found_inf = nonfinite.float()
            elif nonfinite.item():  # (the one host sync of a step, for optimizers that cannot skip by themselves)
                optimizer.zero_grad(set_to_none=True)
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = clip_grad_norm(raw_model, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["tokens"] += sum(objective.positions(b) for b in micro_batches) * world.size  # (rows may be short)
            state["data"] = objective.state_dict()
            step = state["step"]
            if governor is not None and (threads := governor.update()):
                metrics.note(f"CPU threads → {threads}: other processes are using {governor.others:.1f} "
                             f"of {len(governor.cpus)} CPUs")

            # the host learns of skipped steps and stop requests at log steps and wherever it must decide
            # something (an evaluation, a checkpoint, the end); in one process a signal is known at once
            logging_now = step % cfg.log_every == 0 or step == cfg.max_steps
            state["elapsed"] = elapsed_before + time.perf_counter() - t_start
            eval_due = bool(cfg.eval_every) and step % cfg.eval_every == 0 and step < cfg.max_steps
            deciding = (logging_now or eval_due or (cfg.ckpt_every and step % cfg.ckpt_every == 0)
                        or (cfg.max_time and state["elapsed"] >= cfg.max_time)
                        or (stop_at_step is not None and step >= stop_at_step)
                        or (stop_signal.requested and not world.distributed))  # (ranks must decide alike)
            stop_requested = stop_signal.requested and not world.distributed
            if deciding or not skips_on_device:
                n_skipped, run, stop_flag = torch.stack([skipped, streak, flags[1]]).tolist()
                stop_requested = stop_flag > 0
                skipped.zero_()
                state["nonfinite_streak"] = int(run)
                if n_skipped:
                    msg = (f"non-finite loss ({(flags[0] / targets).item()}) at step {step - 1}" if run else
                           f"non-finite loss in {int(n_skipped)} of the steps before step {step}")
                    if cfg.nonfinite == "stop" or run >= cfg.max_nonfinite:
                        metrics.close()
                        raise UserError(
                            f"{msg}: training stopped. Lower train.lr, raise train.warmup_steps or use "
                            f"train.dtype=fp32; the last good checkpoint is in {out}/checkpoints")
                    metrics.note(f"[yellow]{msg}: {int(n_skipped)} step(s) skipped since the last look, "
                                 f"{int(run)} in a row[/]")

            if logging_now or stop_requested:
                last_loss = (flags[0] / targets).item()
            if logging_now:
                now = time.perf_counter()
                tok_s = (state["tokens"] - tokens_at_log) / max(now - t_log, 1e-9)
                mfu = tok_s * flops_per_token / peak
                t_log, tokens_at_log = now, state["tokens"]
                record = {"step": step, "loss": last_loss, "lr": lr, "tokens": state["tokens"],
                          "tok_per_s": round(tok_s, 1), "mfu": round(mfu, 4)}
                if rated:
                    record["mfu_rated"] = round(tok_s * flops_per_token / rated, 4)
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm.item()
                record.update({name: (value / targets).item() for name, value in zip(extra, flags[2:])})
                where = f"step {step}/{cfg.max_steps}"
                if cfg.max_time:
                    where = f"step {step} · {used:.0f}/{cfg.max_time:.0f}s"
                # and the few metrics the objective names as the ones to watch (GRPO's reward, say)
                watched = "".join(f" · {name.replace('_', ' ')} {record[name]:.4g}"
                                  for name in getattr(objective, "shown", ()) if name in record)
                if routers := router_metrics(raw_model):  # (a mixture of experts: its last forward's routing)
                    record |= routers
                    watched += (f" · MoE balance {routers['moe_balance']:.2f} entropy "
                                f"{routers['moe_router_entropy']:.2f}")
                metrics.log(record, f"{where} · loss {last_loss:.4f}{watched} · lr {lr:.2e} · "
                                    f"{human(tok_s)} tok/s · MFU {100 * mfu:.1f}%")

            stop = None
            # a stop request skips a pending evaluation (minutes on a large split): save and leave at once
            if eval_due and not stop_requested:
                val = run_eval(step)
                stop = _stop_after_eval(val, state, cfg)
            if stop_requested:
                stop = "signal"
            elif stop is None and cfg.max_time and state["elapsed"] >= cfg.max_time:
                stop = "max_time"
            elif stop is None and stop_at_step is not None and step >= stop_at_step:
                stop = "stop_at_step"
            if stop or (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.max_steps:
                save(state)
            if stop:
                stopped = stop
                break

    final_dir = None
    if stopped in ("max_steps", "patience", "max_time", "target_val_loss"):
        if stopped != "target_val_loss":  # (that one was just measured)
            val = run_eval(state["step"]) or val
        weights = full_state_dict(model)
        if world.is_main:
            final_dir = save_model_dir(out / "final", raw_model, tokenizer, config, weights=weights)
        barrier(world)
    metrics.close()
    if world.is_main:
        plot_losses(out)
        where = f"model in {final_dir}" if final_dir else f"resume with: commonlm train --resume {out}"
        console.print(f"[bold green]stopped[/] at step {state['step']} ({stopped}); {where}")
    return TrainResult(out, final_dir, state["step"], stopped, last_loss, val, raw_model, stop_signal.signum)


def _stop_after_eval(val: dict[str, float] | None, state: dict[str, Any], cfg) -> str | None:
    """"target_val_loss" once validation reaches the target, "patience" after that many evaluations without a
    new best, else None (the best and the count live in `state`, so that they survive a resume)."""
    if val is None:
        return None
    if cfg.target_val_loss and val["val_loss"] <= cfg.target_val_loss:
        return "target_val_loss"
    if cfg.patience:
        best = state["best_val_loss"]
        if best is None or val["val_loss"] < best:
            state["best_val_loss"], state["evals_since_best"] = val["val_loss"], 0
        else:
            state["evals_since_best"] += 1
            if state["evals_since_best"] >= cfg.patience:
                return "patience"
    return None


def _print_summary(model, config, device, dtype, world, accum, tokens_per_step, objective, peak, latest) -> None:
    c, t = config.model, config.train
    lines = [
        f"model    {c.family}-style · {human(model.num_params())} params "
        f"({human(model.num_params(exclude_embeddings=True))} without embeddings) · "
        f"{c.n_layer} layers · d_model {c.d_model} · {c.n_head} heads ({c.kv_heads} kv) · vocab {c.vocab_size} · "
        f"{human(model.flops_per_token(seq_len_of(config)))}FLOP/token (train)",
        f"data     {objective.describe()}",
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
