"""encodenet_timm.files: atomic files and their modes."""
import os
import stat

import pytest
import torch

from encodenet_timm.files import read_json, save_tensors, write_json


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_follows_the_umask(tmp_path, umask):
    """Issue #25.3: weight files were 0600 (safetensors' own mode) while JSON files followed the umask."""
    before = os.umask(umask)
    try:
        save_tensors(tmp_path / "w.safetensors", {"a": torch.zeros(2)})
        write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(before)
    for name in ("w.safetensors", "r.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert read_json(tmp_path / "r.json") == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "w.safetensors"]  # no temporary file left
