"""ONNX export of the rewritten graph: torch.export -> snlp_transform -> torch.onnx (dynamo).

Invariant: the saved model computes what `snlp_transform(torch.export.export(model, args).module())`
computes (the same SNLP configuration, fallbacks included), so onnxruntime reproduces the
sequential model exactly when `iters` reaches the block size. Needs the `onnx` extra (onnx,
onnxscript; onnxruntime or onnxruntime-gpu to run the file).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import SNLPConfig
from .fx_transform import snlp_transform


def export_onnx(
    model: nn.Module,
    example_inputs: Sequence[Any],
    path: str | Path,
    config: SNLPConfig | dict | None = None,
) -> Path:
    """Write `model`, its layer stack rewritten into the SNLP solve, to the ONNX file `path`.

    The shapes of `example_inputs` are baked in (static shapes); returns the path written.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path must end in .onnx, got {str(path)!r}")
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as missing:
        raise ImportError("ONNX export needs the onnx extra: pip install 'snlp-compile[onnx]'") from missing
    if SNLPConfig.from_options(config).gemv:
        raise ValueError(
            "export_onnx: gemv=True routes linears through snlp::linear, which ONNX has no op for; use gemv=False"
        )
    example_inputs = tuple(example_inputs)
    with torch.no_grad():
        exported = torch.export.export(model, example_inputs).module()
        parallel = snlp_transform(exported, example_inputs, config)
        parallel.training = model.training  # torch.export's module says training: its mode is the model's
        program = torch.onnx.export(parallel, example_inputs, dynamo=True, verbose=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    return path
