"""Helpers of the command line's tests (test_cli*.py): running it, and checking the files it writes."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gradstep.lab import cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m gradstep ARGS`` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "gradstep", *args], capture_output=True, text=True, timeout=180, check=False
    )


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``gradstep ARGS`` in this process: exit status, stdout, stderr."""
    status = cli.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def check_png(path: Path) -> tuple[int, int]:
    """The file is a PNG that two independent readers decode (PIL and matplotlib); returns (width, height)."""
    from matplotlib.image import imread
    from PIL import Image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    with Image.open(path) as image:
        image.load()  # decodes every pixel: a truncated file fails here
        assert image.format == "PNG"
        size = image.size
    pixels = imread(path)
    assert pixels.shape[:2] == (size[1], size[0])
    # Not a blank canvas: a picture was drawn.
    assert float(pixels.std()) > 0.01
    return size


def embedded_pngs(html: str) -> list[bytes]:
    """The PNG images an HTML page embeds as base64 data URIs."""
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def table_row(out: str, label: str) -> list[str]:
    """The cells of the printed table's row for ``label`` (cells are separated by two or more spaces)."""
    line = next(line for line in out.splitlines() if line.startswith(label + " "))
    return re.split(r"\s{2,}", line.strip())
