"""The README's Python examples run as written, in order, in one session."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_python_blocks_run_as_written(capsys, tmp_path, monkeypatch):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    error = float(re.search(r"max \|SNN - QANN\|: (\S+)", out).group(1))
    assert error <= 1e-9  # the library example's claim: the spiking network is the QANN
    assert "settled: [True, True]" in out
    assert namespace["r"].steps == 6 and namespace["r"].settled  # the bundled YOLOv8n at the defaults
