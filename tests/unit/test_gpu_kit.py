"""deploy/gpu_kit.sh's side on the GPU machine: parts kept over several calls, checked against MANIFEST, unpacked,
and an environment that finds the kit's Java. The kit here is a small stand-in in the same format (an xz'd tar of
jre/, site/ and bin/, split in parts); `build` needs a JDK and the package index, and is run by hand."""
import hashlib
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAKE_JAVA = '#!/bin/sh\necho \'openjdk version "17.0.99" (the kit)\' >&2\n'


def _checkout(tmp: Path) -> Path:
    """A checkout's layout with the script and stub packages for the import check."""
    repo = tmp / "repo"
    (repo / "deploy").mkdir(parents=True)
    shutil.copy(REPO / "deploy" / "gpu_kit.sh", repo / "deploy")
    for pkg in ("rnnserve", "service", "service/gateway", "training"):
        (repo / pkg).mkdir(parents=True, exist_ok=True)
        (repo / pkg / "__init__.py").write_text("")
    (repo / "service" / "gateway" / "app.py").write_text("")
    return repo


def _kit(repo: Path, tmp: Path, parts: int = 2) -> list[Path]:
    stage = tmp / "stage"
    (stage / "jre" / "bin").mkdir(parents=True)
    (stage / "jre" / "bin" / "java").write_text(FAKE_JAVA)
    (stage / "jre" / "bin" / "java").chmod(0o755)
    (stage / "site").mkdir()
    (stage / "bin").mkdir()
    tar = tmp / "kit.tar"
    with tarfile.open(tar, "w") as t:
        for name in ("jre", "site", "bin"):
            t.add(stage / name, arcname=name)
    data = lzma.compress(tar.read_bytes())
    kit = repo / ".gpu-kit"
    kit.mkdir()
    size = -(-len(data) // parts)
    files = []
    for i in range(parts):
        files.append(kit / f"part-{i:02d}")
        files[-1].write_bytes(data[i * size:(i + 1) * size])
    (kit / "MANIFEST").write_text(f"parts {parts}\nsha256 {hashlib.sha256(data).hexdigest()}\npython 3.11\n")
    return files


def _run(repo: Path, root: Path, verb: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KIT_ROOT": str(root), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "deploy/gpu_kit.sh", verb], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(shutil.which("xz") is None, reason="needs xz")
def test_parts_carried_over_two_calls_install_once_all_are_kept(tmp_path):
    repo, root = _checkout(tmp_path), tmp_path / "kit-root"
    first, second = _kit(repo, tmp_path)
    kit = repo / ".gpu-kit"
    held = tmp_path / "held"
    shutil.move(kit, held)
    # the first call carries part-00 alone
    kit.mkdir()
    shutil.copy(held / first.name, kit)
    assert _run(repo, root, "add").returncode == 0
    r = _run(repo, root, "install")
    assert r.returncode == 2 and "no MANIFEST among the kept parts" in r.stderr
    # the second carries the rest
    shutil.rmtree(kit)
    kit.mkdir()
    shutil.copy(held / second.name, kit)
    shutil.copy(held / "MANIFEST", kit)
    r = _run(repo, root, "add")
    assert r.returncode == 0 and "MANIFEST part-00 part-01" in r.stdout
    r = _run(repo, root, "install")
    assert r.returncode == 0, r.stderr
    assert 'openjdk version "17.0.99" (the kit)' in r.stdout and "packages: ok" in r.stdout
    assert (repo / "rnnserve" / "service").resolve() == (repo / "service").resolve()
    env = (root / "env.sh").read_text()
    assert f"export JAVA_HOME={root}/jre" in env and f"export PYTHONPATH={repo}:{root}/site" in env


@pytest.mark.skipif(shutil.which("xz") is None, reason="needs xz")
def test_a_missing_or_damaged_part_stops_the_install(tmp_path):
    repo, root = _checkout(tmp_path), tmp_path / "kit-root"
    first, _ = _kit(repo, tmp_path)
    saved = first.read_bytes()
    first.unlink()
    assert _run(repo, root, "add").returncode == 0
    r = _run(repo, root, "install")
    assert r.returncode == 2 and "1 of 2 parts kept" in r.stderr
    first.write_bytes(b"x" + saved[1:])  # one byte changed
    assert _run(repo, root, "add").returncode == 0
    r = _run(repo, root, "install")
    assert r.returncode == 2 and "do not match MANIFEST's sha256" in r.stderr
    assert not (root / "jre").exists()
