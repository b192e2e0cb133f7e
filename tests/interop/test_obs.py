"""TensorBoard event files written by nemo-tool (tests/it/obs.rs) read with tensorboard's own reader."""

import os
from pathlib import Path

import pytest

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def test_tensorboard_reads_our_scalars():
    out = os.environ.get("NEMO_TOOL_INTEROP_OUT")
    if not out or not (Path(out) / "tensorboard").is_dir():
        if os.environ.get("NEMO_TOOL_STRICT"):
            pytest.fail("the Rust test that writes the event file did not run")
        pytest.skip("run through cargo xtask test")
    acc = EventAccumulator(str(Path(out) / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/kd_loss", "val/kd_loss"}
    train = acc.Scalars("train/kd_loss")
    assert [e.step for e in train] == list(range(20))
    assert [round(e.value, 5) for e in train] == [round(10.0 / (1 + s), 5) for s in range(20)]
    assert [e.step for e in acc.Scalars("val/kd_loss")] == [0, 5, 10, 15]
