"""Run configuration: three dataclasses (model, data, train) loaded from YAML and `--set` overrides.

One `RunConfig` describes a training run completely; it is saved as `commonlm.yaml` in the run and in
every model directory, so any stage can rebuild the model from it. Every key and value is checked
against the dataclass fields: an unknown key or a bad value raises `UserError` naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from commonlm.errors import UserError

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelConfig:
    """Shape and switches of the one decoder. `family` picks the Hugging Face class it exports as."""

    family: Literal["gpt2", "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3"] = "llama"
    vocab_size: int = 0  # 0: taken from the tokenizer, rounded up to a multiple of 64
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # 0: same as n_head (multi-head); fewer: grouped-query attention
    d_model: int = 128
    head_dim: int = 0  # 0: d_model // n_head
    d_ff: int = 0  # 0: 4*d_model for gelu, ~8/3*d_model (multiple of 64) for swiglu
    max_seq_len: int = 256
    pos_emb: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    # RoPE scaling (longer contexts than pretraining), as transformers computes it (model/decoder.py, Rotary):
    # linear (positions / factor), dynamic NTK (the base grows with the sequence beyond rope_original_len),
    # yarn (per-frequency blend + attention factor), llama3 (Llama 3.1's per-wavelength blend)
    rope_scaling: Literal["none", "linear", "dynamic", "yarn", "llama3"] = "none"
    rope_factor: float = 1.0
    rope_original_len: int = 0  # the pretraining context the scaling starts from; 0: max_seq_len
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0  # yarn: rotations where interpolation ends ...
    rope_beta_slow: float = 1.0  # ... and where it is complete
    rope_attention_factor: float = 0.0  # yarn: cos/sin scale; 0: 0.1 * ln(rope_factor) + 1
    rope_truncate: bool = True  # yarn: round the blend's dimension range to whole dimensions
    # sliding-window attention (Mistral, Qwen2): each token sees itself and the sliding_window - 1 before it; 0: all
    sliding_window: int = 0
    full_attention_layers: int = 0  # with sliding_window: the first this many layers see everything (Qwen2)
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: Literal["swiglu", "gelu", "gelu_tanh"] = "swiglu"
    qk_norm: bool = False
    bias: bool = False  # biases on every linear layer and LayerNorm
    qkv_bias: bool = False  # biases on the q, k, v projections only (Qwen2)
    tie_embeddings: bool = True
    init_std: float = 0.02
    dropout: float = 0.0
    # mixture of experts (model/moe.py): n_experts > 0 makes every block's MLP routed SwiGLU experts
    n_experts: int = 0
    experts_per_token: int = 2  # top k
    expert_ff_dim: int = 0  # each expert's width; 0: model.d_ff (or its default) / experts_per_token
    n_shared_experts: int = 0  # experts every token runs besides its k routed ones (DeepSeek)
    router_score: Literal["softmax", "sigmoid"] = "softmax"
    router_norm_topk: bool = True  # the k chosen scores renormalised to sum to 1
    balance_rate: float = 0.0  # auxiliary-loss-free balancing: the bias step per training forward (DeepSeek: 1e-3)
    router_aux_loss: float = 0.0  # weight of the load-balancing auxiliary loss; 0: none
    router_bias: bool = False  # a per-expert bias on scores, for the choice only (DeepSeek-V3); balance_rate steps it
    router_scale: float = 1.0  # the chosen experts' weights times this (DeepSeek-V3's routed_scaling_factor)
    expert_groups: int = 1  # experts split into this many groups; a token picks among the best groups_per_token ...
    groups_per_token: int = 1  # ... groups, a group scored by its two best experts (DeepSeek-V3's n_group, topk_group)
    dense_layers: int = 0  # with experts: the first this many layers keep a dense MLP (first_k_dense_replace)
    # multi-head latent attention (DeepSeek-V2/V3, model/mla.py): kv_lora_rank > 0 compresses keys and values into one
    # latent of that size per token (what the KV cache stores, with one shared rotary key of qk_rope_head_dim)
    kv_lora_rank: int = 0
    q_lora_rank: int = 0  # queries through a latent of this size too; 0: one plain projection
    qk_nope_head_dim: int = 0  # latent attention: each head's query/key dimensions without rotary positions ...
    qk_rope_head_dim: int = 0  # ... and with them (the key's part shared by all heads)
    v_head_dim: int = 0  # latent attention: each head's value dimension
    rope_mscale_all_dim: float = 0.0  # yarn, latent attention: softmax scale x (0.1 * this * ln(rope_factor) + 1)^2

    @property
    def moe_ff_dim(self) -> int:
        return self.expert_ff_dim or max(1, self.ff_dim // self.experts_per_token)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def dim_head(self) -> int:
        """Each head's query/key dimension (latent attention: its unrotated and rotated parts together)."""
        if self.kv_lora_rank:
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim or self.d_model // self.n_head

    @property
    def rope_dim(self) -> int:
        """The dimensions of a head that rotary positions rotate."""
        return self.qk_rope_head_dim if self.kv_lora_rank else self.dim_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "swiglu":
            return 64 * ((8 * self.d_model // 3 + 63) // 64)
        return 4 * self.d_model

    def validate(self) -> None:
        _check(self.n_layer >= 1, "model.n_layer", self.n_layer, "must be at least 1")
        _check(self.n_head >= 1, "model.n_head", self.n_head, "must be at least 1")
        _check(self.d_model >= 1, "model.d_model", self.d_model, "must be at least 1")
        _check(self.max_seq_len >= 2, "model.max_seq_len", self.max_seq_len, "must be at least 2")
        _check(self.vocab_size >= 0, "model.vocab_size", self.vocab_size, "must be >= 0 (0 = from tokenizer)")
        _check(self.head_dim >= 0, "model.head_dim", self.head_dim, "must be >= 0 (0 = d_model // n_head)")
        _check(self.d_ff >= 0, "model.d_ff", self.d_ff, "must be >= 0 (0 = from model.mlp)")
        _check(self.init_std > 0, "model.init_std", self.init_std, "must be positive")
        _check(
            self.head_dim > 0 or self.kv_lora_rank > 0 or self.d_model % self.n_head == 0,
            "model.d_model",
            self.d_model,
            f"must be divisible by model.n_head={self.n_head} (or set model.head_dim)",
        )
        _check(
            self.n_kv_head >= 0 and self.n_head % self.kv_heads == 0,
            "model.n_kv_head",
            self.n_kv_head,
            f"must divide model.n_head={self.n_head}",
        )
        _check(self.dim_head % 2 == 0 or self.pos_emb != "rope" or self.kv_lora_rank, "model.head_dim", self.dim_head,
               "must be even")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must be in [0, 1)")
        _check(self.rope_theta > 0, "model.rope_theta", self.rope_theta, "must be positive")
        _check(self.rope_scaling == "none" or self.pos_emb == "rope", "model.rope_scaling", self.rope_scaling,
               "scales rotary positions: set model.pos_emb=rope or rope_scaling=none")
        _check(self.rope_factor >= 1.0 or self.rope_scaling == "linear" and self.rope_factor > 0, "model.rope_factor",
               self.rope_factor, "must be >= 1 (linear scaling: positive)")
        _check(self.rope_original_len >= 0, "model.rope_original_len", self.rope_original_len,
               "must be >= 0 (0 = model.max_seq_len)")
        _check(0 < self.rope_low_freq_factor < self.rope_high_freq_factor, "model.rope_low_freq_factor",
               self.rope_low_freq_factor, f"must be in (0, rope_high_freq_factor={self.rope_high_freq_factor})")
        _check(self.rope_beta_fast > self.rope_beta_slow > 0, "model.rope_beta_fast", self.rope_beta_fast,
               f"must exceed rope_beta_slow={self.rope_beta_slow} > 0")
        _check(self.sliding_window >= 0, "model.sliding_window", self.sliding_window, "must be >= 0 (0 = off)")
        _check(0 <= self.full_attention_layers < self.n_layer or not self.sliding_window, "model.full_attention_layers",
               self.full_attention_layers, f"must be in [0, model.n_layer={self.n_layer}) with a sliding window")
        _check(self.rope_attention_factor >= 0, "model.rope_attention_factor", self.rope_attention_factor,
               "must be >= 0 (0 = from rope_factor)")
        _check(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "must be positive")
        _check(self.n_experts >= 0, "model.n_experts", self.n_experts, "must be >= 0 (0 = a dense MLP)")
        if self.n_experts or self.family == "qwen3_moe":
            _check(self.n_experts > 0, "model.n_experts", self.n_experts, "must be positive for family qwen3_moe")
            _check(1 <= self.experts_per_token <= self.n_experts, "model.experts_per_token", self.experts_per_token,
                   f"must be in [1, model.n_experts={self.n_experts}]")
            _check(self.mlp == "swiglu", "model.mlp", self.mlp, "experts are SwiGLU: set model.mlp=swiglu")
            _check(self.expert_ff_dim >= 0, "model.expert_ff_dim", self.expert_ff_dim, "must be >= 0 (0 = derived)")
            _check(self.n_shared_experts >= 0, "model.n_shared_experts", self.n_shared_experts, "must be >= 0")
            _check(self.balance_rate >= 0, "model.balance_rate", self.balance_rate, "must be >= 0 (0 = off)")
            _check(self.router_aux_loss >= 0, "model.router_aux_loss", self.router_aux_loss, "must be >= 0 (0 = off)")
            _check(not self.bias, "model.bias", self.bias, "experts have no biases: set model.bias=false")
            _check(self.router_scale > 0, "model.router_scale", self.router_scale, "must be positive")
            _check(self.expert_groups >= 1 and self.n_experts % self.expert_groups == 0, "model.expert_groups",
                   self.expert_groups, f"must divide model.n_experts={self.n_experts}")
            _check(1 <= self.groups_per_token <= self.expert_groups, "model.groups_per_token", self.groups_per_token,
                   f"must be in [1, model.expert_groups={self.expert_groups}]")
            _check(self.expert_groups == 1 or self.n_experts // self.expert_groups >= 2, "model.expert_groups",
                   self.expert_groups, "leaves fewer than 2 experts per group (a group is scored by its best two)")
            _check(self.experts_per_token <= self.groups_per_token * (self.n_experts // self.expert_groups),
                   "model.experts_per_token", self.experts_per_token, "exceeds the experts of the groups a token picks")
            _check(0 <= self.dense_layers < self.n_layer, "model.dense_layers", self.dense_layers,
                   f"must be in [0, model.n_layer={self.n_layer}) (0 dense layers first; all dense: n_experts=0)")
        _check(self.dense_layers == 0 or self.n_experts > 0, "model.dense_layers", self.dense_layers,
               "counts the dense layers before the expert layers: set model.n_experts, or leave it at 0")
        _check(self.rope_mscale_all_dim == 0 or self.kv_lora_rank > 0 and self.rope_scaling == "yarn",
               "model.rope_mscale_all_dim", self.rope_mscale_all_dim,
               "scales latent attention's softmax under yarn: set model.kv_lora_rank and rope_scaling=yarn, or 0")
        if self.kv_lora_rank or self.family == "deepseek_v3":
            self._validate_latent_attention()

    def _validate_latent_attention(self) -> None:
        _check(self.kv_lora_rank > 0, "model.kv_lora_rank", self.kv_lora_rank,
               "must be positive for family deepseek_v3 (its attention is latent)")
        for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _check(getattr(self, name) > 0, f"model.{name}", getattr(self, name),
                   "must be positive with latent attention (model.kv_lora_rank > 0)")
        _check(self.q_lora_rank >= 0, "model.q_lora_rank", self.q_lora_rank, "must be >= 0 (0 = a plain q projection)")
        _check(self.qk_rope_head_dim % 2 == 0, "model.qk_rope_head_dim", self.qk_rope_head_dim, "must be even")
        _check(self.pos_emb == "rope", "model.pos_emb", self.pos_emb, "latent attention needs rope (its decoupled key)")
        _check(self.head_dim == 0, "model.head_dim", self.head_dim,
               "latent attention sizes heads with qk_nope_head_dim, qk_rope_head_dim, v_head_dim: leave it at 0")
        _check(self.kv_heads == self.n_head, "model.n_kv_head", self.n_kv_head,
               "latent attention up-projects keys and values for every head: leave it at 0")
        _check(not self.qk_norm, "model.qk_norm", self.qk_norm, "latent attention normalises its latents instead")
        _check(self.rope_mscale_all_dim >= 0, "model.rope_mscale_all_dim", self.rope_mscale_all_dim, "must be >= 0")


@dataclass
class DataConfig:
    """Where the prepared token shards live (the output of `commonlm data prepare`)."""

    path: str = ""


@dataclass
class TrainConfig:
    """Optimisation, schedule, evaluation, checkpointing and logging of one run."""

    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast where the device supports it
    seq_len: int = 0  # 0: model.max_seq_len
    micro_batch_size: int = 16  # sequences per forward pass, per process
    tokens_per_step: int = 0  # 0: one micro-batch per process; else gradient accumulation reaches it
    max_steps: int = 1000
    max_time: float = 0.0  # seconds; 0: no limit. Training stops (and saves) when reached.
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays to min lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: off
    # muon: Muon for the 2-D hidden weights, AdamW (the settings above) for embeddings, head, norms, biases (optim.py)
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton-Schulz iterations per step
    muon_adjust_lr: Literal["match_rms_adamw", "original"] = "match_rms_adamw"  # match_rms_adamw: AdamW's lr fits
    muon_lr_ratio: float = 1.0  # Muon's lr = this x the schedule's lr
    compile: bool = False
    activation_checkpointing: bool = False
    eval_every: int = 200  # 0: only at the end
    eval_tokens: int = 262144  # validation tokens per evaluation; 0: the whole split
    patience: int = 0  # stop after this many evaluations without improvement; 0: off
    target_val_loss: float = 0.0  # stop (and save the model) after an evaluation with val_loss <= this; 0: off
    ckpt_every: int = 500  # 0: only at the end
    keep_last: int = 3
    log_every: int = 10
    nonfinite: Literal["skip", "stop"] = "skip"
    max_nonfinite: int = 10  # with nonfinite=skip: stop after this many skipped steps in a row
    threads: int = 0  # CPU threads for torch; 0: the CPUs other processes leave free, re-checked (threads.py)
    # several processes (torchrun): ddp keeps a whole copy of the model and its optimizer on each; fsdp shards
    # weights, gradients and optimizer state over them (train/parallel.py) and checkpoints with DCP; hsdp shards
    # within groups of shard_size processes and replicates across the groups (a 2-D mesh: replicas x shard_size)
    parallel: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    shard_size: int = 0  # hsdp: processes per shard group (the world size must be a multiple); 0: those of a node
    # continue from the newest checkpoint in the run directory when it has one, else start: the same command
    # line serves the first start and every restart (torchrun --max-restarts, a requeued or preempted job)
    auto_resume: bool = False
    # pretraining, or fine-tuning: tune/sft.py, dpo.py, grpo.py
    objective: Literal["next_token", "sft", "dpo", "grpo"] = "next_token"
    init: str = ""  # the model directory a fine-tuning run started from (the tune verbs set it to --init)
    # sft: lay a micro-batch's conversations side by side in rows of the context (positions restart, attention
    # stays within each) instead of one padded row each: less padding (tune/sft.py); `tune sft` turns it on
    pack: bool = False
    # -- dpo (tune/dpo.py)
    dpo_beta: float = 0.1  # dpo: how far the policy may move from the reference (larger: less far)
    dpo_loss: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"  # sigmoid DPO, IPO, or reference-free SimPO
    simpo_gamma: float = 0.5  # simpo: the target reward margin (TRL CPOConfig's default)
    reference: str = ""  # dpo (not simpo), grpo with a KL term: the frozen reference model's directory (`tune` sets it)
    # -- lora (tune/lora.py): adapters on a frozen base; 0: full fine-tuning
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # Hugging Face module names
    base_quant: Literal["", "int8", "int4"] = ""  # lora: keep the frozen base weights quantized (QLoRA)
    # -- grpo (tune/grpo.py): RL with verifiable rewards
    reward: str = ""  # gsm8k | exact | path/to/file.py:function (the user's own code, run in-process)
    grpo_group_size: int = 8  # completions sampled per prompt
    grpo_max_new_tokens: int = 128
    grpo_temperature: float = 1.0
    grpo_clip: float = 0.2  # epsilon of the clipped objective
    grpo_kl_beta: float = 0.0  # weight of the KL term to the reference (0: none, no reference model)
    # -- swarm (scale/swarm.py): this run is one volunteer of a decentralized DiLoCo run over torchft
    swarm: str = ""  # the lighthouse's HOST:PORT (`commonlm swarm lighthouse`); "": an ordinary run
    swarm_sync_every: int = 100  # H: inner steps between outer syncs
    swarm_outer_lr: float = 0.7  # outer SGD on the averaged pseudo-gradients (the DiLoCo paper's values)
    swarm_outer_momentum: float = 0.9  # Nesterov; 0: plain averaging steps
    # what a pseudo-gradient is sent as (scale/compress.py): fp32 (none); bf16 (half the bytes), int8 (a quarter) or
    # its largest entries (topk), each with error feedback
    swarm_compress: Literal["none", "bf16", "int8", "topk"] = "none"
    swarm_topk: float = 0.01  # topk: the fraction of each pseudo-gradient's entries sent at a sync
    swarm_fragments: int = 1  # Streaming DiLoCo: the model in this many fragments of blocks, synced H / N steps apart
    swarm_min_replicas: int = 1  # apply an outer step only when at least this many volunteers took part
    swarm_timeout: float = 120.0  # seconds for an all-reduce, a commit, fetching a peer's state, connecting
    swarm_quorum_timeout: float = 3600.0  # seconds a sync waits for the lighthouse's quorum (others are slower)
    swarm_port: int = 0  # this volunteer's torchft manager port (every interface); 0: any free one
    swarm_advertise: str = ""  # address other volunteers reach this one at; "": the one routing to the lighthouse
    # a first defence against a bad volunteer: an update (pseudo-gradient) whose norm exceeds this many times the
    # median of the volunteers' norms is scaled down to it before averaging; 0: off (see scale/swarm.py for what
    # it does not stop)
    swarm_max_norm_ratio: float = 0.0

    def validate(self) -> None:
        positive = ["micro_batch_size", "max_steps", "log_every", "keep_last", "max_nonfinite"]
        for name in positive:
            _check(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), "must be at least 1")
        non_negative = ["seq_len", "tokens_per_step", "warmup_steps", "eval_every", "eval_tokens", "patience",
                        "target_val_loss", "ckpt_every", "grad_clip", "weight_decay", "max_time", "threads"]
        for name in non_negative:
            _check(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "must be >= 0")
        _check(self.lr > 0, "train.lr", self.lr, "must be positive")
        _check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(0 < self.decay_fraction <= 1, "train.decay_fraction", self.decay_fraction, "must be in (0, 1]")
        _check(0 <= self.beta1 < 1, "train.beta1", self.beta1, "must be in [0, 1)")
        _check(0 <= self.beta2 < 1, "train.beta2", self.beta2, "must be in [0, 1)")
        _check(self.eps > 0, "train.eps", self.eps, "must be positive")
        _check(0 <= self.muon_momentum < 1, "train.muon_momentum", self.muon_momentum, "must be in [0, 1)")
        _check(1 <= self.muon_ns_steps < 100, "train.muon_ns_steps", self.muon_ns_steps, "must be in [1, 100)")
        _check(self.muon_lr_ratio > 0, "train.muon_lr_ratio", self.muon_lr_ratio, "must be positive")
        _check(self.shard_size >= 0, "train.shard_size", self.shard_size, "must be >= 0 (0: the processes of a node)")
        _check(self.parallel == "hsdp" or not self.shard_size, "train.shard_size", self.shard_size,
               "is for train.parallel=hsdp (processes per shard group): set train.parallel=hsdp, or leave it at 0")
        _check(self.optimizer == "adamw" or not self.swarm, "train.optimizer", self.optimizer,
               "is not a swarm volunteer's inner optimizer yet: use train.optimizer=adamw with train.swarm")
        if self.objective == "grpo":
            self._validate_grpo()
        if self.swarm:
            self._validate_swarm()
        _check(self.dpo_beta > 0, "train.dpo_beta", self.dpo_beta, "must be positive")
        _check(self.objective != "dpo" or self.dpo_loss == "simpo" or bool(self.reference), "train.reference",
               self.reference, f"must name the reference model directory for objective dpo ({self.dpo_loss} loss)")
        _check(self.simpo_gamma >= 0, "train.simpo_gamma", self.simpo_gamma, "must be >= 0")
        _check(self.lora_rank >= 0, "train.lora_rank", self.lora_rank, "must be >= 0 (0: full fine-tuning)")
        _check(self.lora_alpha > 0, "train.lora_alpha", self.lora_alpha, "must be positive")
        _check(0 <= self.lora_dropout < 1, "train.lora_dropout", self.lora_dropout, "must be in [0, 1)")
        _check(not self.lora_rank or any(t.strip() for t in self.lora_targets.split(",")), "train.lora_targets",
               self.lora_targets, "must name at least one module (comma-separated, e.g. q_proj,v_proj)")
        _check(not self.base_quant or self.lora_rank > 0, "train.base_quant", self.base_quant,
               "quantizes the frozen base of a LoRA run: set train.lora_rank (--lora-rank) too")
        _check(self.parallel == "ddp" or not self.lora_rank, "train.parallel", self.parallel,
               "does not shard LoRA runs yet (their trainable part is small): use train.parallel=ddp")
        _check(self.parallel == "ddp" or self.objective != "grpo", "train.parallel", self.parallel,
               "does not shard GRPO runs yet (each rank samples its own rollouts): use train.parallel=ddp")

    def _validate_swarm(self) -> None:
        host, _, port = self.swarm.removeprefix("http://").rpartition(":")
        _check(bool(host) and port.isdigit(), "train.swarm", self.swarm,
               "must be the lighthouse's HOST:PORT (what `commonlm swarm lighthouse` prints)")
        for name in ("swarm_sync_every", "swarm_min_replicas", "swarm_fragments"):
            _check(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), "must be at least 1")
        _check(self.swarm_sync_every % self.swarm_fragments == 0, "train.swarm_fragments", self.swarm_fragments,
               f"must divide train.swarm_sync_every={self.swarm_sync_every} (a fragment is synced every H / N steps)")
        _check(0 < self.swarm_topk <= 1, "train.swarm_topk", self.swarm_topk,
               "must be in (0, 1]: the fraction of each pseudo-gradient's entries sent (e.g. 0.01)")
        for name in ("swarm_outer_lr", "swarm_timeout", "swarm_quorum_timeout"):
            _check(getattr(self, name) > 0, f"train.{name}", getattr(self, name), "must be positive")
        _check(0 <= self.swarm_outer_momentum < 1, "train.swarm_outer_momentum", self.swarm_outer_momentum,
               "must be in [0, 1)")
        _check(0 <= self.swarm_port < 65536, "train.swarm_port", self.swarm_port, "must be a port (0: any free one)")
        _check(self.swarm_max_norm_ratio == 0 or self.swarm_max_norm_ratio >= 1, "train.swarm_max_norm_ratio",
               self.swarm_max_norm_ratio, "must be 0 (off) or at least 1 (times the median update norm)")

    def _validate_grpo(self) -> None:
        _check(bool(self.reward), "train.reward", self.reward, "must name a reward for objective grpo: gsm8k, "
               "exact or FILE.py:FUNCTION (tune grpo --reward)")
        _check(self.grpo_group_size >= 2, "train.grpo_group_size", self.grpo_group_size,
               "must be at least 2 (advantages compare the completions of a prompt)")
        _check(self.grpo_max_new_tokens >= 1, "train.grpo_max_new_tokens", self.grpo_max_new_tokens,
               "must be at least 1")
        _check(self.grpo_temperature > 0, "train.grpo_temperature", self.grpo_temperature, "must be positive")
        _check(self.grpo_clip > 0, "train.grpo_clip", self.grpo_clip, "must be positive")
        _check(self.grpo_kl_beta >= 0, "train.grpo_kl_beta", self.grpo_kl_beta, "must be >= 0 (0: no KL term)")
        _check(self.grpo_kl_beta == 0 or bool(self.reference), "train.reference", self.reference,
               "must name the reference model directory when train.grpo_kl_beta > 0")
        for name in ("patience", "target_val_loss"):
            _check(not getattr(self, name), f"train.{name}", getattr(self, name), "must be 0 for objective grpo: "
                   "its evaluation measures reward (val_reward), not a loss to stop on")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> RunConfig:
        self.model.validate()
        self.train.validate()
        seq = self.train.seq_len or self.model.max_seq_len
        limit = self.model.max_seq_len
        _check(seq <= limit, "train.seq_len", seq, f"must be <= model.max_seq_len={limit}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        from commonlm.utils import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise UserError(f"config: {key}={value!r} {why}")


# ---------------------------------------------------------------------------------------------------
# Building configs from dicts, YAML files, presets and dotted overrides


def _number(text: str) -> int | float | str:
    """'3e-4' -> 0.0003, '8' -> 8, anything else unchanged. PyYAML (YAML 1.1) reads 3e-4 as a string: it
    wants 3.0e-4; people write 3e-4, in YAML files and in --set alike."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a field's type hint; ints are accepted where floats are expected, and strings
    that spell a number where numbers are."""
    if hint in (int, float) and isinstance(value, str):
        value = _number(value.strip())
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise UserError(f"config: {key}={value!r} is not one of: {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            if arm is type(None) and value is None:
                return None
        arms = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(value, arms[0], key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config: {key}={value!r} must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"config: {key}={value!r} must be an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"config: {key}={value!r} must be a number")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config: {key}={value!r} must be a string")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"config: {prefix or 'top level'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in known:
            raise UserError(f"config: unknown key '{full}' (known: {', '.join(known)})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, hint, full)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    return _build(RunConfig, data or {}, "")


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A preset name (`tiny`, `qwen3-0.6b`) or a YAML path (`configs/tiny.yaml`, `my.yaml`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name[: -len(path.suffix)] if path.suffix in (".yaml", ".yml") else path.name
    preset = PRESET_DIR / f"{name}.yaml"
    if preset.is_file():
        return preset
    raise UserError(
        f"config: no file or preset named '{name_or_path}' (presets: {', '.join(list_presets())})"
    )


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"config: {path} is not valid YAML ({str(e).splitlines()[0]})") from e
    except OSError as e:
        raise UserError(f"config: cannot read {path} ({e.strerror})") from e
    return data or {}


def parse_override(item: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 0.0003); values are parsed as YAML scalars."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), _number(value) if isinstance(value, str) else value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        key, value = parse_override(item)
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: '{part}' is not a section")
        node[parts[-1]] = value
    return data


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Preset or YAML file, then `--set` overrides, then validation."""
    data = read_yaml(resolve_config_path(name_or_path)) if name_or_path else {}
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data).validate()
