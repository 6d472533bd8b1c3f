"""rnnserve attention: the matrix has a row per output token and a column per source token, and the
command writes a PNG of it."""
import subprocess
import sys

from matplotlib.image import imread

from rnnserve.attention_plot import attention


def test_matrix_shape(tiny_translation_folder):
    a = attention(tiny_translation_folder, "Ein Hund läuft im Park.", beam_size=2)
    assert len(a.weights) == len(a.output) and all(len(row) == len(a.source) for row in a.weights)
    assert all(abs(sum(row) - 1) < 1e-4 for row in a.weights)  # attention is a distribution over the source


def test_command_writes_a_png(tiny_translation_folder, tmp_path):
    out = tmp_path / "a.png"
    r = subprocess.run([sys.executable, "-m", "rnnserve.cli", "attention", str(tiny_translation_folder),
                        "Ein Hund läuft.", "--out", str(out), "--beam-size", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(out).shape[0] >= 300
