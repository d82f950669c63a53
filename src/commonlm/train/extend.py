"""Continue training a model with changes to its config that leave its weights as they are: a longer context.

`commonlm train --init MODEL --set model.max_seq_len=1024 model.rope_scaling=yarn model.rope_factor=4` goes on
from MODEL's weights with a longer context and scaled rotary positions (the context-extension recipe, see
bench/context_extension.py). The run's model is MODEL's config with the `--set model.*` changes applied; a change
is allowed only where no weight changes shape (CONTEXT_FIELDS): the context with rotary positions, RoPE and its
scaling, sliding windows, dropout; and a mixture of experts' training-only settings (TRAINING_FIELDS: a model
directory leaves the balancing rate out, so fine-tuning with balancing sets it again). Any other change (layers,
widths, the vocabulary, a learned position table's length) is refused, naming the field, rather than silently
ignored or half loaded.

A scaling that reads the pretraining context (dynamic, yarn, llama3) starts from MODEL's context unless
`model.rope_original_len` says otherwise: the context the weights learned their positions in.
"""

from __future__ import annotations

from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from commonlm.config import ModelConfig, RunConfig, apply_overrides, config_from_dict, read_yaml, resolve_config_path
from commonlm.errors import UserError
from commonlm.model.decoder import Decoder

CONTEXT_FIELDS = ("max_seq_len", "rope_theta", "rope_scaling", "rope_factor", "rope_original_len",
                  "rope_low_freq_factor", "rope_high_freq_factor", "rope_beta_fast", "rope_beta_slow",
                  "rope_attention_factor", "rope_truncate", "sliding_window", "full_attention_layers", "dropout")
# training-only settings of a mixture of experts: the balancing rate (its pending load is state, not a weight, and
# starts empty) and the auxiliary loss's weight; a model directory leaves the rate out (modeldir.inference_form)
TRAINING_FIELDS = ("balance_rate", "router_aux_loss")
READS_ORIGINAL = ("dynamic", "yarn", "llama3")  # the scalings that read rope_original_len


def init_run_config(init: str | Path, preset: str | None, overrides: list[str]) -> RunConfig:
    """The config of `train --init`: the preset's (or the defaults') training settings, `init`'s model, then
    `overrides` (`model.*` ones change that model, within CONTEXT_FIELDS: see `continued_config`)."""
    from commonlm.api import resolve_model_path
    from commonlm.modeldir import read_run_config

    data = read_yaml(resolve_config_path(preset)) if preset else {}
    data["model"] = asdict(read_run_config(resolve_model_path(init))[0].model)
    return config_from_dict(apply_overrides(data, overrides)).validate()


def continued_config(init: ModelConfig, asked: ModelConfig, where: str | Path) -> ModelConfig:
    """`init` (the loaded model's config) with the changes `asked` makes to it, or a UserError naming the first
    change that would reshape a weight. `asked` left entirely at the defaults (a config made without model
    settings, as Python callers of `train(..., init=)` pass) asks for nothing."""
    if asked == ModelConfig():
        return init
    if not asked.vocab_size:  # (0: the tokenizer's size, and the trainer checked that init's tokenizer is the data's)
        asked = replace(asked, vocab_size=init.vocab_size)
    changed = [f.name for f in fields(ModelConfig) if getattr(asked, f.name) != getattr(init, f.name)]
    for name in changed:
        learned_table = name == "max_seq_len" and init.pos_emb == "learned"
        if name not in CONTEXT_FIELDS + TRAINING_FIELDS or learned_table:
            what = "its learned position table has that many rows" if learned_table else "it would reshape weights"
            raise UserError(f"--init {where}: model.{name}={getattr(asked, name)!r} cannot change from the model's "
                            f"{getattr(init, name)!r} ({what}); with --init, only "
                            f"{', '.join(CONTEXT_FIELDS + TRAINING_FIELDS)} may change"
                            f"{' (with rotary positions)' if learned_table else ''}")
    biased = [c.router_bias or c.balance_rate > 0 for c in (init, asked)]
    if init.n_experts and biased[0] != biased[1]:
        change = "add" if biased[1] else "drop"
        raise UserError(f"--init {where}: model.balance_rate={asked.balance_rate!r} would {change} the router's bias "
                        f"(model.router_bias={init.router_bias}); only a model whose router has one may start or stop "
                        "balancing")
    out = replace(init, **{name: getattr(asked, name) for name in changed})
    if out.rope_scaling in READS_ORIGINAL and not out.rope_original_len and "rope_original_len" not in changed:
        out = replace(out, rope_original_len=init.rope_original_len or init.max_seq_len)
    out.validate()
    return out


def continued_model(model: Decoder, asked: ModelConfig, where: str | Path, device: torch.device) -> Decoder:
    """`model` itself when `asked` changes nothing, else a decoder of the continued config holding its weights
    (rotary tables and windows are made from the config when a decoder is built)."""
    config = continued_config(model.config, asked, where)
    if config == model.config:
        return model
    with torch.device("meta"):
        extended = Decoder(config)
    extended.materialize(device)
    pending = extended.load_state_dict(model.state_dict(), strict=False)  # (a balancing load started or stopped)
    if any(not name.endswith(".balance_load") for name in pending.missing_keys + pending.unexpected_keys):
        raise RuntimeError(f"continued model: tensors differ beyond the balancing load: {pending}")
    for name in pending.missing_keys:  # balancing starts: no load seen yet (materialize left the memory undefined)
        extended.get_buffer(name).zero_()
    return extended
