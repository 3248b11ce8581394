"""`train.precision: mixed_bfloat16` on both paths: hidden layers in bfloat16, the softmax in float32."""

import json
import math

from stages.common import read_model

import numpy as np
import pytest
from conftest import run_stage, set_params


@pytest.mark.parametrize("jit", [True, False])
def test_mixed_bfloat16_trains_with_a_float32_output(prepared, jit):
    set_params(prepared, {"train.precision": "mixed_bfloat16", "train.jit_compile": jit, "train.epochs": 1})
    run_stage("train", prepared)
    import keras

    model = read_model(prepared / "data/model.keras")
    *hidden, output = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert len(hidden) == 2
    for layer in hidden:  # mixed: bfloat16 arithmetic on float32 weights
        assert (layer.compute_dtype, layer.kernel.dtype) == ("bfloat16", "float32")
    assert (output.compute_dtype, output.kernel.dtype) == ("float32", "float32")
    with np.load(prepared / "data/prepared/val.npz") as f:
        probs = model(f["x"][:8].reshape(8, -1) / f["divisor"])
    assert probs.dtype == "float32"
    metrics = json.loads((prepared / "metrics/train/metrics.json").read_text())
    values = [metrics[k][m] for k in ("train", "eval") for m in ("loss", "accuracy")]
    assert all(math.isfinite(v) for v in values)
    assert metrics["eval"]["accuracy"] > 0.3  # synthetic digits, 1 epoch: well above chance (0.1)
