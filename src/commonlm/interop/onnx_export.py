"""ONNX export of the forward pass: input_ids [batch, seq] (int64) -> logits [batch, seq, vocab] (fp32).

Uses PyTorch's `torch.export`-based ONNX exporter (opset 18) with dynamic batch and sequence axes
(sequence up to the model's max_seq_len). The KV cache is not exported: the graph recomputes the whole
sequence, which suits scoring and embedding in other runtimes; generation belongs to our engine.
Needs the `onnx` and `onnxscript` packages (`pip install "commonlm[onnx]"`).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch

from commonlm.errors import UserError
from commonlm.model.decoder import Decoder

OPSET = 18


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: Decoder):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)[0]


def export_onnx(model: Decoder, out: str | Path) -> Path:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UserError(f"export: ONNX needs the '{e.name}' package (pip install onnx onnxscript)") from e
    if model.config.n_experts:
        raise UserError("export: ONNX has no path for mixture-of-experts models yet (tokens go to experts by a "
                        "data-dependent split); export to transformers (the default format) instead")
    out = Path(out)
    model = model.float().eval()
    example = torch.zeros(2, min(8, model.config.max_seq_len), dtype=torch.long)
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=model.config.max_seq_len)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _LogitsOnly(model), (example,), input_names=["input_ids"], output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}}, dynamo=True, opset_version=OPSET, verbose=False,
        )
        # Saved under its final name in a temporary directory, since over 2 GB the weights go to a second file
        # that the graph names; then moved beside `out`, the graph last. A failure leaves nothing behind.
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".tmp-{out.name}-") as tmp:
            program.save(str(Path(tmp) / out.name))
            for file in sorted(Path(tmp).iterdir(), key=lambda f: f.name == out.name):
                os.replace(file, out.parent / file.name)
    return out
