"""Install detectron2's Python package on platforms without a detectron2 wheel.

The package registry's only usable detectron2 release is the sdist ``pb1-detectron2==0.6``, a copy of
detectron2 v0.6 whose C++ sources are missing, so ``pip install`` of it fails while compiling. Its
Python package works once ``transfer.d2compat`` bridges a few gaps, so this script downloads the sdist
(hash-pinned), verifies it, and copies the ``detectron2`` package into site-packages with a
``.dist-info`` so ``pip list``/``pip uninstall pb1-detectron2`` see it.

Nothing is done when ``import detectron2`` already works (e.g. a from-source build with CUDA ops).
The copy is staged under a temporary name and renamed into place, so a failure leaves nothing behind.

    python scripts/install_detectron2.py [--sdist FILE] [--site-packages DIR] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
DIST_INFO = f"pb1_detectron2-{SDIST_VERSION}.dist-info"


class InstallError(RuntimeError):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sdist(path: Path, expected: str = SDIST_SHA256) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise InstallError(
            f"sha256 mismatch for {path.name}: expected {expected}, got {actual}. "
            "The file is not the audited pb1-detectron2 0.6 release; refusing to install it. "
            "Check your package index/mirror, delete the file and rerun."
        )


def detectron2_usable(python: str = sys.executable) -> tuple[bool, str]:
    """Import detectron2 (through the compatibility layer) in a fresh interpreter."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "import transfer.d2compat as c; d2 = c.import_detectron2()\n"
        "print(d2.__version__, d2.__file__)"
    )
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if proc.returncode == 0:
        return True, proc.stdout.strip()
    errors = proc.stderr.strip().splitlines()
    return False, errors[-1] if errors else f"exit status {proc.returncode}"


def download_sdist(dest: Path) -> Path:
    requirement = dest / "requirements.txt"
    requirement.write_text(f"{SDIST_NAME}=={SDIST_VERSION} --hash=sha256:{SDIST_SHA256}\n")
    cmd = [
        sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
        "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "--require-hashes",
        "-r", str(requirement), "-d", str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"))
    if proc.returncode != 0 or not found:
        tail = "\n".join(line for line in proc.stderr.splitlines() if "is ignored" not in line)[-2000:]
        raise InstallError(
            f"could not download {SDIST_NAME}=={SDIST_VERSION} from the package registry:\n{tail}\n"
            "Check network access to PyPI (or pass --sdist FILE with a local copy of the sdist)."
        )
    return found[0]


def install_from_sdist(sdist: Path, site_packages: Path, expected_sha256: str = SDIST_SHA256) -> Path:
    verify_sdist(sdist, expected_sha256)
    target = site_packages / "detectron2"
    with tempfile.TemporaryDirectory(dir=site_packages, prefix=".d2-install-") as tmp:
        tmp_path = Path(tmp)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp_path, filter="data")
        source = tmp_path / f"{SDIST_NAME}-{SDIST_VERSION}" / "detectron2"
        if not (source / "__init__.py").is_file():
            raise InstallError(f"{sdist} does not contain the detectron2 package; is it the right file?")
        staged = tmp_path / "detectron2"
        shutil.move(str(source), staged)
        dist_info = tmp_path / DIST_INFO
        dist_info.mkdir()
        _write_dist_info(dist_info, staged)
        for old in (target, site_packages / DIST_INFO):
            if old.exists():
                shutil.rmtree(old)
        os.replace(staged, target)
        os.replace(dist_info, site_packages / DIST_INFO)
    return target


def _write_dist_info(dist_info: Path, package: Path) -> None:
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\n"
        f"Name: {SDIST_NAME}\nVersion: {SDIST_VERSION}\n"
        "Summary: detectron2 v0.6 Python package (no compiled ops), installed by "
        "masked-contrastive-ssl's scripts/install_detectron2.py\n"
        "Home-page: https://github.com/facebookresearch/detectron2\n"
    )
    (dist_info / "INSTALLER").write_text("masked-contrastive-ssl\n")
    (dist_info / "top_level.txt").write_text("detectron2\n")
    rows = [f"{p.relative_to(package.parent).as_posix()},," for p in sorted(package.rglob("*")) if p.is_file()]
    rows += [f"{DIST_INFO}/{name},," for name in ("METADATA", "INSTALLER", "top_level.txt", "RECORD")]
    (dist_info / "RECORD").write_text("\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdist", type=Path, help="install from this local pb1-detectron2-0.6.tar.gz")
    parser.add_argument("--site-packages", type=Path, default=Path(sysconfig.get_paths()["purelib"]))
    parser.add_argument("--force", action="store_true", help="reinstall even if detectron2 imports")
    args = parser.parse_args(argv)
    try:
        if not args.force:
            ok, info = detectron2_usable()
            if ok:
                print(f"[setup] detectron2 {info} is usable; not reinstalling", file=sys.stderr)
                return 0
            existing = args.site_packages / "detectron2"
            if existing.exists() and not (args.site_packages / DIST_INFO).exists():
                raise InstallError(
                    f"a detectron2 installation at {existing} does not import ({info}). It was not "
                    "installed by this script, so it is left alone: fix or remove it, then rerun."
                )
        with tempfile.TemporaryDirectory(prefix="d2-sdist-") as tmp:
            sdist = args.sdist if args.sdist else download_sdist(Path(tmp))
            target = install_from_sdist(sdist, args.site_packages)
        ok, info = detectron2_usable()
        if not ok:
            raise InstallError(f"detectron2 was copied to {target} but does not import: {info}")
        print(f"[setup] installed detectron2 {info} (pure Python; compiled ops unavailable)", file=sys.stderr)
        return 0
    except InstallError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
