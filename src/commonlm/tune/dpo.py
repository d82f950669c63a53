"""Direct preference optimization and its cheap variants (IPO, SimPO): one objective of the one training loop
(train/objective.py), the variant chosen by `train.dpo_loss`.

The data is preference pairs (`commonlm data prepare --format preference`): conversation 2k of a split is pair
k's prompt with its chosen reply, 2k + 1 the same prompt with its rejected reply, and only the reply's tokens are
targets. A reply's log-probability is the sum of its tokens' log-probabilities, and its length n the number of
those tokens. With the policy's (pc, pr), the frozen reference model's (rc, rr) and beta = train.dpo_beta, the
loss of a pair is (the formulas of TRL 1.16, which tests/tune/test_dpo.py checks ours against):

    sigmoid   -logsigmoid(beta * ((pc - rc) - (pr - rr)))                            DPO (TRL DPOTrainer)
    ipo       ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2                IPO, length-averaged (DPOTrainer)
    simpo     -logsigmoid(beta * (pc / nc - pr / nr) - gamma)                        SimPO (CPOTrainer, cpo_alpha=0)

gamma = train.simpo_gamma. The rewards logged are beta * (pc - rc) and beta * (pr - rr) (sigmoid, ipo) or
beta * pc / nc and beta * pr / nr (simpo, which has no reference), as TRL logs them.

The reference is the model the run started from (`train.reference`, which `tune dpo` sets to --init, so that
`train --resume` finds it again). Its log-probabilities are computed once, when the objective is made, for every
training and validation pair (on every rank), and the reference model is then dropped: that costs one forward
pass per reply up front and two floats per pair of memory, instead of a second model in memory (and a second
forward pass per step) during training. SimPO loads no reference and computes none.

A micro-batch is `micro_batch_size` pairs (twice as many rows); `targets` counts pairs, so the loop's step loss
is the mean over pairs, and the metrics (the chosen and rejected rewards, their margin, and the accuracy
margin > 0) are means over pairs too.

    commonlm tune dpo --init MODEL_DIR --data PREFERENCE_DATA --out RUN     (dpo_config below: its defaults)
    commonlm tune dpo ... --set train.dpo_loss=simpo train.dpo_beta=2 train.simpo_gamma=1
    commonlm train --resume RUN
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from commonlm.config import RunConfig
from commonlm.model.loss import IGNORE
from commonlm.runtime import autocast
from commonlm.tune.sft import ChatSFT, rows, sft_config
from commonlm.utils import human
from commonlm.world import World, all_reduce_sum

# x, y [2B, T] (chosen, rejected, ...), the reference's log-probabilities [B, 2] (None for SimPO)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
METRICS = ("chosen_reward", "rejected_reward", "margin", "accuracy")
LOSSES = ("sigmoid", "ipo", "simpo")


def reply_logps(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[R]: per row, the sum of the log-probabilities of its targets (y != IGNORE), in fp32."""
    logp = logits.float().log_softmax(-1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(y != IGNORE, logp, 0.0).sum(-1)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor | None, lengths: torch.Tensor, beta: float,
             kind: str = "sigmoid", gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: the loss of variant `kind` (the module docstring's formulas), the chosen reward and the rejected
    one. `policy`, `reference` (unused by simpo) and `lengths` are [B, 2]: (chosen, rejected) log-probability
    sums and target token counts."""
    if kind == "simpo":
        average = policy / lengths.clamp(min=1)
        chosen, rejected = beta * average[:, 0], beta * average[:, 1]
        return -F.logsigmoid(chosen - rejected - gamma), chosen, rejected
    assert reference is not None, f"{kind} needs the reference's log-probabilities"
    ratio = policy - reference
    chosen, rejected = beta * ratio[:, 0], beta * ratio[:, 1]
    if kind == "sigmoid":
        return -F.logsigmoid(chosen - rejected), chosen, rejected
    if kind == "ipo":
        average = ratio / lengths.clamp(min=1)
        return (average[:, 0] - average[:, 1] - 1 / (2 * beta)) ** 2, chosen, rejected
    raise ValueError(f"unknown preference loss {kind!r}; one of {LOSSES}")


class DPO(ChatSFT):
    """Pairs in ChatSFT's seeded per-epoch order (its position state, so resuming is exact)."""

    PER_ITEM = 2
    shown = ("margin", "accuracy")

    def __init__(self, config: RunConfig, world: World, device: torch.device, dtype: torch.dtype,
                 model: torch.nn.Module | None = None):
        from commonlm.modeldir import load_model_dir

        super().__init__(config, world, device, dtype, model)
        cfg = config.train
        self.beta, self.kind, self.gamma, self.reference_path = cfg.dpo_beta, cfg.dpo_loss, cfg.simpo_gamma, ""
        splits = [split for split in ("train", "val") if self.data.has_split(split)]
        self.pairs = {split: self.data.conversations(split) // 2 for split in splits}
        self.reference: dict[str, torch.Tensor] = {}
        if self.kind != "simpo":
            self.reference_path = cfg.reference
            reference, _, _ = load_model_dir(cfg.reference, device=device)
            reference.eval()
            self.reference = {split: self._reference_logps(reference, split) for split in splits}

    def _rows(self, split: str, pairs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        convs = [self.data.conversation(split, 2 * k + j) for k in pairs for j in (0, 1)]
        return rows(convs, self.context, self.pad, self.device)

    @torch.no_grad()
    def _reference_logps(self, model: torch.nn.Module, split: str) -> torch.Tensor:
        """[pairs, 2]: the reference's log-probabilities of every pair's chosen and rejected reply."""
        n = self.pairs[split]
        out = []
        for start in range(0, n, self.batch):
            x, y = self._rows(split, list(range(start, min(start + self.batch, n))))
            with autocast(self.device, self.dtype):
                logits, _ = model(x)
            out.append(reply_logps(logits, y))
        return torch.cat(out).view(-1, 2)

    def _batch(self, split: str, pairs: list[int]) -> Batch:
        return (*self._rows(split, pairs), self.reference[split][pairs] if self.reference else None)

    def next_batch(self) -> Batch:
        return self._batch("train", self._pick())

    def targets(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch[0].shape[0] // 2, device=self.device)

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss summed over the batch's pairs, and the metrics' sums; MoE auxiliary losses (means per
        forward pass) weighted by the pair count, like the loss."""
        x, y, reference = batch
        with autocast(self.device, self.dtype):
            logits, aux = model(x)
        policy = reply_logps(logits, y).view(-1, 2)
        lengths = (y != IGNORE).sum(-1).view(-1, 2)
        losses, chosen, rejected = dpo_loss(policy, reference, lengths, self.beta, self.kind, self.gamma)
        margin = (chosen - rejected).detach()
        metrics = dict(zip(METRICS, (chosen.detach().sum(), rejected.detach().sum(), margin.sum(),
                                     (margin > 0).float().sum())))  # fmt: skip
        weighted = {name: value * len(losses) for name, value in aux.items()}
        return losses.sum() + sum(weighted.values()), metrics | weighted

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float] | None:
        """Loss and metrics per pair over every validation pair (this rank's share, then summed)."""
        if not self.pairs.get("val"):
            return None
        was_training = model.training
        model.eval()
        total = torch.zeros(2 + len(METRICS), dtype=torch.float64, device=self.device)
        mine = list(range(self.world.rank, self.pairs["val"], self.world.size))
        for start in range(0, len(mine), self.batch):
            batch = self._batch("val", mine[start : start + self.batch])
            loss, parts = self.loss(model, batch)
            total += torch.stack([loss, self.targets(batch), *(parts[m] for m in METRICS)]).double()
        all_reduce_sum(total, self.world)
        model.train(was_training)
        pairs = max(total[1].item(), 1.0)
        values = {f"val_{m}": v.item() / pairs for m, v in zip(METRICS, total[2:])}
        return {"val_loss": total[0].item() / pairs, **values, "val_pairs": int(total[1].item())}

    def describe(self) -> str:
        d = self.data
        val = f" · val {self.pairs['val']} pairs" if "val" in self.pairs else " · no val split"
        variant = (f"simpo, beta {self.beta}, gamma {self.gamma}, no reference" if self.kind == "simpo"
                   else f"{self.kind}, beta {self.beta}, reference {self.reference_path}")
        return f"{d.path} (preference) · train {self.n} pairs, {human(d.tokens('train'))} tokens{val} · {variant}"


# DPO starts from SFT's fine-tuning settings (tune/sft.py) with these: a much lower learning rate (the
# policy should stay near the reference; 5e-6 is the usual scale for real models, TRL's default being 1e-6),
# 4 pairs (8 replies) per micro-batch, and beta 0.1 (TRL's default; the SimPO paper uses beta 2-10 with its
# length-averaged rewards, and gamma/beta about 0.5: set both with train.dpo_beta and train.simpo_gamma).
DPO_DEFAULTS = ["train.objective=dpo", "train.lr=5e-6", "train.micro_batch_size=4", "train.warmup_steps=10",
                "train.dpo_beta=0.1"]


def dpo_config(init: str, data: str, overrides: list[str]) -> RunConfig:
    """The config of a preference run from the model directory (or run) `init` on preference data `data`;
    `init` is also the frozen reference (train.reference), except for SimPO, which has none."""
    from commonlm.api import resolve_model_path

    reference = Path(resolve_model_path(init)).resolve()
    config = sft_config(init, data, DPO_DEFAULTS + [f"train.reference={reference}", *overrides])
    if config.train.dpo_loss == "simpo":
        config.train.reference = ""
    return config
