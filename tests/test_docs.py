"""The code in docs/use-weights.md runs as written, against a backbone.pt saved the way pre-training saves it."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python_blocks(md: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", md.read_text(), flags=re.S)


def test_monai_swinunetr_snippet_loads_our_backbone(tmp_path, monkeypatch, capsys):
    from voco.models import build_model
    from voco.models.record import backbone_meta, save_model

    net = build_model("swinunetr", out_channels=21, feature_size=12)
    path = tmp_path / "runs/pretrain/default/stage2/backbone.pt"
    path.parent.mkdir(parents=True)
    save_model(path, net.state_dict(), backbone_meta({"name": "swinunetr", "feature_size": 12}, 21))
    blocks = _python_blocks(REPO / "docs/use-weights.md")
    assert blocks, "no python snippet in docs/use-weights.md"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "docs/use-weights.md", "exec"), scope)  # noqa: S102 - the documented snippet
    loaded = scope["net"].state_dict()
    assert scope["net"].__class__.__module__.startswith("monai.")
    for k, v in net.state_dict().items():
        if not k.startswith("out."):
            assert (loaded[k] == v).all(), k
    assert "tensors loaded" in capsys.readouterr().out
