"""Plot titles say what a reader needs to tell plots apart: the model, the setting and the severity."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tta.run import plots


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list:
    saved: list = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.append(fig) or path)
    return saved


def _rows() -> pd.DataFrame:
    cells = [(label, corruption, severity) for label in ("source", "tent") for corruption in ("fog", "snow")
             for severity in (3, 5)]
    return pd.DataFrame([{"label": label, "replicate": 0, "corruption": c, "severity": s, "error": 10.0 + s,
                          "model": "resnet20", "setting": "mixed"} for label, c, s in cells])


def test_titles_name_model_setting_and_severity(tmp_path: Path, figures: list) -> None:
    rows = _rows()
    plots.error_vs_severity(rows, tmp_path / "a.png")
    plots.heatmap(pd.DataFrame(index=["source", "tent"], columns=["fog", "snow"]), rows, 5, tmp_path / "b.png")
    batches = pd.DataFrame([{"label": "tent", "config_hash": "h", "batch": b, "segment": 0, "corruption": "fog",
                             "severity": 5, "n": 100, "accuracy": 50.0, "model": "resnet20", "setting": "mixed"}
                            for b in range(4)])
    plots.stream_accuracy(batches, tmp_path / "c.png")
    assert [fig.axes[0].get_title() for fig in figures] == [
        "resnet20, mixed: mean error over corruptions, severities 3, 5",
        "resnet20, mixed: error per corruption, severity 5",
        "resnet20, mixed: accuracy along the stream, severity 5",
    ]
