"""Where metrics go: ``metrics.jsonl``, TensorBoard event files and a progress bar (process 0 only)."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping

import tqdm


class MetricsWriter:
    def __init__(self, workdir: pathlib.Path, *, total_steps: int, initial_step: int, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = self._tb = self._bar = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
        self._tb = SummaryWriter(str(workdir / "tensorboard"))
        self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                              mininterval=1.0, desc="train")

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{f"{prefix}{k}": _json_number(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
        if self._bar is not None and "loss" in metrics:
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.tqdm.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        self._tb.close()
        self._jsonl.close()


def _json_number(value: float) -> float | int | str:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf
    return value
