"""Set-up refuses what it cannot trust: wrong sdist hashes, an unreachable registry, partial installs."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("install_detectron2", REPO / "scripts" / "install_detectron2.py")
installer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(installer)

OFFLINE_ENV = {
    **os.environ,
    "PIP_CONFIG_FILE": os.devnull,  # ignore this machine's local wheel mirrors
    "PIP_INDEX_URL": "http://127.0.0.1:9/simple",  # nothing listens there
    "PIP_RETRIES": "0",
    "PIP_TIMEOUT": "2",
}


def _fake_sdist(path: Path, with_package: bool = True) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        files = {"pb1-detectron2-0.6/PKG-INFO": b"Name: pb1-detectron2\n"}
        if with_package:
            files["pb1-detectron2-0.6/detectron2/__init__.py"] = b"__version__ = '0.6'\n"
            files["pb1-detectron2-0.6/detectron2/layers/__init__.py"] = b""
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_wrong_sdist_hash_is_refused_and_nothing_installed(tmp_path: Path, capsys):
    sdist = _fake_sdist(tmp_path / "pb1-detectron2-0.6.tar.gz")
    site = tmp_path / "site"
    site.mkdir()
    assert installer.main(["--sdist", str(sdist), "--site-packages", str(site), "--force"]) == 1
    err = capsys.readouterr().err
    assert "sha256 mismatch" in err and installer.SDIST_SHA256 in err
    assert list(site.iterdir()) == [], "a refused install must leave nothing behind"


def test_install_from_verified_sdist_is_complete(tmp_path: Path):
    sdist = _fake_sdist(tmp_path / "pb1-detectron2-0.6.tar.gz")
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    site = tmp_path / "site"
    site.mkdir()
    target = installer.install_from_sdist(sdist, site, expected_sha256=digest)
    assert target == site / "detectron2" and (target / "layers" / "__init__.py").is_file()
    record = (site / installer.DIST_INFO / "RECORD").read_text()
    assert "detectron2/__init__.py" in record
    assert sorted(p.name for p in site.iterdir()) == ["detectron2", installer.DIST_INFO]


def test_sdist_without_the_package_is_refused(tmp_path: Path):
    sdist = _fake_sdist(tmp_path / "pb1-detectron2-0.6.tar.gz", with_package=False)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    site = tmp_path / "site"
    site.mkdir()
    with pytest.raises(installer.InstallError, match="does not contain the detectron2 package"):
        installer.install_from_sdist(sdist, site, expected_sha256=digest)
    assert list(site.iterdir()) == []


def test_unreachable_registry_gives_a_clear_error(tmp_path: Path):
    code = (
        "import importlib.util, sys; from pathlib import Path\n"
        f"spec = importlib.util.spec_from_file_location('i', {str(REPO / 'scripts' / 'install_detectron2.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"try:\n    m.download_sdist(Path({str(tmp_path)!r}))\nexcept m.InstallError as e:\n    print('InstallError', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=OFFLINE_ENV, timeout=120)
    assert "InstallError could not download pb1-detectron2==0.6" in proc.stdout
    assert "network access" in proc.stdout


@pytest.mark.slow
def test_setup_without_registry_stops_and_marks_nothing_ready(tmp_path: Path):
    venv = tmp_path / "venv"
    env = {**OFFLINE_ENV, "MCSSL_VENV": str(venv)}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "setup_env.sh")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode != 0
    assert "set-up failed" in proc.stderr and "NOT marked ready" in proc.stderr
    assert not (venv / ".mcssl-ready").exists()
