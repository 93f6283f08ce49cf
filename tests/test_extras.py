"""The optional extras: `onnx-gpu` cannot be installed on our GPU machine (no network there), so it is
tested for installability only: it names the `onnx` extra's packages with onnxruntime-gpu in place of
onnxruntime, and the package index offers onnxruntime-gpu for this platform and Python."""

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _extras() -> dict[str, list[str]]:
    return tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]


def test_the_gpu_extra_is_the_onnx_extra_with_the_gpu_runtime():
    extras = _extras()
    gpu = ["onnxruntime" if name == "onnxruntime-gpu" else name for name in extras["onnx-gpu"]]
    assert sorted(gpu) == sorted(extras["onnx"]) and "onnxruntime-gpu" in extras["onnx-gpu"]


def test_the_index_offers_onnxruntime_gpu_for_this_platform():
    try:
        found = subprocess.run(
            [sys.executable, "-m", "pip", "index", "versions", "onnxruntime-gpu"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("the package index did not answer within 60 s")
    if found.returncode != 0 and ("No matching distribution" not in found.stderr + found.stdout):
        pytest.skip(f"no package index reachable: {found.stderr.strip()[-200:]}")
    assert found.returncode == 0, found.stderr
    assert "Available versions:" in found.stdout
