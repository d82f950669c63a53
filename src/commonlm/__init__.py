"""CommonLM: build your own language model end to end.

The top-level names load lazily so that `commonlm --help` and data workers do not import torch.
(The training function is `pretrain`: `commonlm.train` is the subpackage.)
"""

__version__ = "0.1.0"

_LAZY = {
    "load": "commonlm.api",
    "pretrain": "commonlm.api",
    "LanguageModel": "commonlm.api",
    "load_config": "commonlm.config",
    "RunConfig": "commonlm.config",
    "ModelConfig": "commonlm.config",
    "TrainConfig": "commonlm.config",
    "Tokenizer": "commonlm.data.tokenizer",
    "prepare": "commonlm.data.prepare",
    "UserError": "commonlm.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'commonlm' has no attribute {name!r}")


__all__ = list(_LAZY)
