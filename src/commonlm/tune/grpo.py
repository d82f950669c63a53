"""GRPO (group relative policy optimization), RL with verifiable rewards: an objective of the one training loop.

A micro-batch is `micro_batch_size` prompts of this rank (data/prompts.py), each with `grpo_group_size`
completions sampled from the model being trained, by the one batched, KV-cached engine (infer/engine.py),
at `grpo_temperature`, at most `grpo_max_new_tokens` tokens each. A reward (tune/rewards.py) scores every
completion against the prompt's answer; a completion's advantage is its reward against its group's:

    A = (r - mean of the group) / (std of the group, Bessel-corrected, + 1e-4)

and each completion token t (log-probabilities from logits / temperature, as TRL's) costs

    -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta (exp(ref - logp) - (ref - logp) - 1)
    rho = exp(logp - old_logp), eps = grpo_clip, beta = grpo_kl_beta

With one update per batch of rollouts the old policy is the current one (old_logp = logp, detached: rho = 1
at the update, as in TRL with num_iterations=1), so the clip fraction is 0 by construction; it is logged all
the same. The KL term (TRL's k3 estimator) is only there when grpo_kl_beta > 0, against the reference model
`train.reference` (grpo_config sets it to --init), whose log-probabilities are taken at rollout time.

Targets are completion tokens, so the loop's step loss is the sum over the step's completion tokens (all
micro-batches, all ranks) over their number: TRL's default "dapo" normalisation. The per-token metrics
(clip_fraction, kl) are then means over tokens; the per-completion ones (reward, reward_std: the std within
a group, completion_length, truncated: the share that hit the length limit) are weighted by the step's tokens
per completion, so that the loop's division by tokens makes them means over completions.

Sampling is reproducible: completion k of the j-th prompt of micro-batch n (counted over the run, all ranks
together) is seeded from (train.seed, n, j, k), and n is part of the position state, so a resumed run samples
what the uninterrupted one did. Rollouts run the engine on the model itself (eval mode, then back to train).

evaluate() is the mean reward of greedy completions of the validation prompts (`val_reward`, higher is
better); there is no validation loss, so train.patience and train.target_val_loss are refused for grpo.

    commonlm data prepare --format prompts --input problems.jsonl --tokenizer MODEL --out PROMPTS
    commonlm tune grpo --init MODEL --data PROMPTS --reward gsm8k --out RUN
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from commonlm.config import RunConfig
from commonlm.data.prompts import Prompt, PromptData
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.infer.engine import Engine, Request
from commonlm.model.loss import IGNORE
from commonlm.runtime import autocast
from commonlm.tune.rewards import Scorer, check_reward, load_reward
from commonlm.tune.sft import ChatSFT, sft_config
from commonlm.world import World, all_reduce_sum

PER_COMPLETION = ("reward", "reward_std", "completion_length", "truncated")


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """[P, G] rewards of P groups of G completions -> their advantages (r - group mean) / (group std + eps)."""
    return (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + eps)


def token_logps(logits: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """[R, T]: the log-probability of each target under softmax(logits / temperature), in fp32; 0 where y is
    IGNORE."""
    logp = (logits.float() / temperature).log_softmax(-1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(y != IGNORE, logp, 0.0)


def clipped_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: -min(rho A, clip(rho, 1 - eps, 1 + eps) A) with rho = exp(logp - old_logp), and whether the
    clip is what counted (rho below 1 - eps with A < 0, or above 1 + eps with A > 0)."""
    ratio = torch.exp(logp - old_logp)
    loss = -torch.minimum(ratio * advantages, ratio.clamp(1 - eps, 1 + eps) * advantages)
    clipped = ((ratio < 1 - eps) & (advantages < 0)) | ((ratio > 1 + eps) & (advantages > 0))
    return loss, clipped


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per token, the k3 estimate of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


class _StepCounts:
    """The completion tokens and completions of the micro-batches drawn for one optimizer step on this rank;
    summed over ranks at the step's first loss (every rank gets there alike)."""

    def __init__(self) -> None:
        self.tokens, self.completions = 0, 0
        self.tokens_per_completion: torch.Tensor | None = None


@dataclass
class Batch:
    x: torch.Tensor  # [R, T] prompt + completion, shifted; R = prompts x group
    y: torch.Tensor  # [R, T] the completion tokens (end-of-turn included when sampled), IGNORE elsewhere
    advantages: torch.Tensor  # [R]
    per_completion: torch.Tensor  # [R, len(PER_COMPLETION)]
    ref_logp: torch.Tensor | None  # [R, T] the reference's log-probs of y, when grpo_kl_beta > 0
    step: _StepCounts


@dataclass
class Completion:
    ids: list[int]  # generated, with the stop id that ended it appended
    text: str
    truncated: bool  # stopped by the length limit, not by a stop id


class GRPO(ChatSFT):
    """Prompts in ChatSFT's seeded per-epoch order (its position state, plus the count of micro-batches drawn,
    which seeds sampling), `micro_batch_size` prompts per rank per micro-batch."""

    shown = ("reward", "completion_length")

    def __init__(self, config: RunConfig, world: World, device: torch.device, dtype: torch.dtype,
                 model: torch.nn.Module | None = None):
        if model is None:
            raise ValueError("GRPO samples from the model it trains: make it with model=")
        cfg = config.train
        self.data = PromptData(config.data.path)
        self.tokenizer = Tokenizer.load(self.data.path)
        self.data.check_tokenizer(self.tokenizer)
        self.train_prompts = self.data.prompts("train")
        self.n = len(self.train_prompts)
        if self.n == 0:
            raise UserError(f"data: {self.data.path} has no training prompts")
        self.context = cfg.seq_len or config.model.max_seq_len
        long = [p for split in self.data.splits.values() for p in split if len(p.ids) >= self.context]
        if long:
            raise UserError(f"data: {len(long)} prompts of {self.data.path} are {max(len(p.ids) for p in long)} tokens "
                            f"or longer, leaving no room to answer in the context of {self.context}; shorten them")
        self.batch, self.seed = cfg.micro_batch_size, cfg.seed
        self.world, self.device, self.dtype = world, device, dtype
        self.epoch, self.cursor, self.drawn = 0, 0, 0
        self._perm: tuple[int, np.ndarray] | None = None
        self.model = model
        self.group, self.max_new, self.temperature = cfg.grpo_group_size, cfg.grpo_max_new_tokens, cfg.grpo_temperature
        self.clip, self.beta, self.reward_name = cfg.grpo_clip, cfg.grpo_kl_beta, cfg.reward
        self.reference_path = cfg.reference
        check_reward(cfg.reward)
        self.score = Scorer(load_reward(cfg.reward))
        self.reference = None
        if self.beta > 0:
            from commonlm.modeldir import load_model_dir

            self.reference, _, _ = load_model_dir(cfg.reference, device=device)
            self.reference.eval().requires_grad_(False)
        self._step: _StepCounts | None = None

    # -- rollouts ---------------------------------------------------------------------------------------
    def _sample(self, prompts: list[Prompt], group: int, temperature: float,
                seeds: list[int] | None) -> list[Completion]:
        """`group` completions of every prompt (prompt-major), by the engine on the model being trained."""
        model = self.model
        was_training = model.training
        prompt_tokens = sum(len(p.ids) for p in prompts) * group
        # under autocast the keys and values come out in its dtype: the cache holds that dtype
        engine = Engine(model, max_batch=len(prompts) * group, max_len=self.context, prefill_chunk=prompt_tokens,
                        dtype=self.dtype)
        ids = [p.ids for p in prompts for _ in range(group)]
        requests = [Request(prompt_ids=row, max_tokens=self.max_new, temperature=temperature,
                            seed=seeds[r] if seeds else None, stop_ids=self.tokenizer.stop_ids)
                    for r, row in enumerate(ids)]
        try:
            with autocast(self.device, self.dtype):
                seqs = engine.run_all(requests)
        finally:
            model.train(was_training)
        return [Completion(s.generated + ([s.stop_id] if s.stop_id is not None else []),
                           self.tokenizer.decode(s.generated), s.finish_reason != "stop") for s in seqs]

    def _seeds(self, n_prompts: int) -> list[int]:
        """Seeds of this rank's completions in micro-batch `self.drawn`: from (seed, micro-batch, prompt's place
        among all ranks' prompts, completion)."""
        first = self.world.rank * n_prompts
        return [int(np.random.SeedSequence([self.seed, self.drawn, first + j, k]).generate_state(1)[0])
                for j in range(n_prompts) for k in range(self.group)]

    def next_batch(self) -> Batch:
        prompts = [self.train_prompts[i] for i in self._pick()]
        completions = self._sample(prompts, self.group, self.temperature, self._seeds(len(prompts)))
        self.drawn += 1
        rewards = torch.tensor([self.score(c.text, p.answer, p.prompt) for p, c in
                                zip((p for p in prompts for _ in range(self.group)), completions)],
                               dtype=torch.float32).view(len(prompts), self.group)
        advantages = group_advantages(rewards).flatten()
        spread = rewards.std(-1, keepdim=True).expand(-1, self.group).flatten()
        lengths = torch.tensor([float(len(c.ids)) for c in completions])
        truncated = torch.tensor([float(c.truncated) for c in completions])
        per_completion = torch.stack([rewards.flatten(), spread, lengths, truncated], -1)
        x, y = self._rows([p.ids for p in prompts for _ in range(self.group)], [c.ids for c in completions])
        ref_logp = None
        if self.reference is not None:
            with torch.no_grad(), autocast(self.device, self.dtype):
                ref_logp = token_logps(self.reference(x)[0], y, self.temperature)
        if self._step is None or self._step.tokens_per_completion is not None:  # the first micro-batch of a step
            self._step = _StepCounts()
        self._step.tokens += int(lengths.sum().item())
        self._step.completions += len(completions)
        return Batch(x, y, advantages.to(self.device), per_completion.to(self.device), ref_logp, self._step)

    def _rows(self, prompts: list[list[int]], completions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y [R, T]: prompt + completion shifted by one, padded after its end; y only on the completion."""
        T = max(len(p) + len(c) for p, c in zip(prompts, completions)) - 1
        x = torch.full((len(prompts), T), self.tokenizer.pad_id, dtype=torch.long)
        y = torch.full((len(prompts), T), IGNORE, dtype=torch.long)
        for r, (p, c) in enumerate(zip(prompts, completions)):
            ids = torch.tensor(p + c)
            x[r, : len(ids) - 1] = ids[:-1]
            y[r, len(p) - 1 : len(ids) - 1] = ids[len(p) :]
        return x.to(self.device), y.to(self.device)

    # -- the loop's side --------------------------------------------------------------------------------
    def targets(self, batch: Batch) -> torch.Tensor:
        return (batch.y != IGNORE).sum()

    def positions(self, batch: Batch) -> int:
        return batch.x.numel()

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The clipped objective (plus the KL term) summed over completion tokens, and the metrics' sums (see
        the module docstring); MoE auxiliary losses weighted by the token count, like the loss."""
        step = batch.step
        if step.tokens_per_completion is None:
            counts = torch.tensor([step.tokens, step.completions], dtype=torch.float64, device=self.device)
            counts = all_reduce_sum(counts, self.world)
            step.tokens_per_completion = (counts[0] / counts[1]).float()
        with autocast(self.device, self.dtype):
            logits, aux = model(batch.x)
        mask = batch.y != IGNORE
        logp = token_logps(logits, batch.y, self.temperature)
        per_token, clipped = clipped_loss(logp, logp.detach(), batch.advantages[:, None], self.clip)
        metrics = {"clip_fraction": (clipped & mask).float().sum()}
        if batch.ref_logp is not None:
            kl = kl_k3(logp, batch.ref_logp)
            per_token = per_token + self.beta * kl
            metrics["kl"] = torch.where(mask, kl, 0.0).detach().sum()
        sums = batch.per_completion.sum(0) * step.tokens_per_completion
        metrics.update(dict(zip(PER_COMPLETION, sums)))
        n = mask.sum()
        weighted = {name: value * n for name, value in aux.items()}
        return torch.where(mask, per_token, 0.0).sum() + sum(weighted.values()), metrics | weighted

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float] | None:
        """The mean reward of greedy completions over every validation prompt (this rank's share, then summed)."""
        if not self.data.has_split("val"):
            return None
        prompts = self.data.prompts("val")
        mine = prompts[self.world.rank :: self.world.size]
        total = torch.zeros(3, dtype=torch.float64, device=self.device)  # reward, completion tokens, prompts
        per_batch = self.batch * self.group
        for start in range(0, len(mine), per_batch):
            chunk = mine[start : start + per_batch]
            for p, c in zip(chunk, self._sample(chunk, 1, 0.0, None)):
                total += torch.tensor([self.score(c.text, p.answer, p.prompt), len(c.ids), 1.0],
                                      dtype=torch.float64, device=self.device)
        all_reduce_sum(total, self.world)
        count = max(total[2].item(), 1.0)
        return {"val_reward": total[0].item() / count, "val_completion_length": total[1].item() / count,
                "val_prompts": int(total[2].item())}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.drawn = int(state.get("drawn", 0))

    def describe(self) -> str:
        val = f" · val {len(self.data.prompts('val'))} prompts" if self.data.has_split("val") else " · no val split"
        kl = f", KL {self.beta} to {self.reference_path}" if self.beta > 0 else ""
        return (f"{self.data.path} (prompts) · train {self.n} prompts{val} · reward {self.reward_name} · "
                f"{self.group} completions of <= {self.max_new} tokens at temperature {self.temperature}{kl}")


# GRPO starts from SFT's fine-tuning settings (tune/sft.py) with these: TRL's learning rate (1e-6) and group
# of 8 completions, 2 prompts (16 completions) per micro-batch, no weight decay (TRL's), and fewer evaluations
# (each one generates a completion of every validation prompt).
GRPO_DEFAULTS = ["train.objective=grpo", "train.lr=1e-6", "train.micro_batch_size=2", "train.warmup_steps=10",
                 "train.weight_decay=0", "train.grpo_group_size=8", "train.eval_every=50"]


def grpo_config(init: str, data: str, overrides: list[str]) -> RunConfig:
    """The config of a GRPO run from the model directory (or run) `init` on prompts data `data` (with
    train.reward among the overrides); `init` is also the reference (train.reference) that a KL term
    (grpo_kl_beta > 0) holds the policy to."""
    from commonlm.api import resolve_model_path

    reference = Path(resolve_model_path(init)).resolve()
    config = sft_config(init, data, GRPO_DEFAULTS + [f"train.reference={reference}", *overrides])
    check_reward(config.train.reward)  # a missing file: one line now, not after loading the model
    return config
