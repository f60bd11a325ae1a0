"""The end-to-end example under examples/ runs (shortened) and shows learning."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


def test_hf_segformer_example_learns(tmp_path):
    spec = importlib.util.spec_from_file_location("hf_segformer_hssn", ROOT / "examples" / "hf_segformer_hssn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--out", str(tmp_path)]) == 0  # exits 1 unless the loss fell and mIoU > 2x chance
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["loss_last"] < result["loss_first"]
    assert result["after"]["eval_miou_depth1"] > result["before"]["eval_miou_depth1"]
    assert result["after"]["eval_consistency_rate"] == 1.0  # path decoding
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "predictions.png").stat().st_size > 0
