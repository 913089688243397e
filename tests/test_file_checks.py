"""encodenet_timm.file_checks: which unreadable image files each ``data.scan`` mode finds (the files named
before training and mid-epoch, through fit and the CLI, are tested in test_bad_input.py)."""
import io
from pathlib import Path

from PIL import Image

from encodenet_timm.file_checks import scan_files

from test_bad_input import _folder, _spoil


def test_scan_names_what_verify_catches_and_decode_catches_the_rest(tmp_path):
    train = _folder(tmp_path)
    garbage, truncated, jpeg = _spoil(train)
    empty = train / "digit0" / "003.png"
    empty.write_bytes(b"")
    inner = train / "digit2" / "001.bmp"  # a truncated BMP: verify() passes it, decoding does not
    buf = io.BytesIO()
    Image.open(train / "digit2" / "001.png").save(buf, "BMP")
    inner.write_bytes(buf.getvalue()[:500])
    (train / "digit2" / "001.png").unlink()
    files = [str(p) for p in sorted(train.rglob("*.*"))]
    bad = {Path(p).name + p.split("/")[-2]: r for _, p, r in scan_files(files, "verify")}
    assert set(bad) == {"001.pngdigit0", "003.pngdigit0", "002.pngdigit1", "000.jpgdigit2"}
    assert "truncated JPEG" in bad["000.jpgdigit2"]
    decoded = {p for _, p, _ in scan_files(files, "decode")}
    assert decoded == {str(p) for p in (garbage, empty, truncated, jpeg, inner)}
    assert scan_files(files, "none") == []
