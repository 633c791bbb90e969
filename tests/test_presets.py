"""The presets ship inside the package, so `--preset` works after a normal install, and the
checkout's `pipelines/` shows exactly those files."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pipelines_folder_is_the_packaged_presets():
    shipped = ROOT / "cfiw_cli" / "presets"
    assert sorted(p.name for p in (ROOT / "pipelines").glob("*.toml")) == sorted(p.name for p in shipped.glob("*.toml"))
    for preset in shipped.glob("*.toml"):
        assert (ROOT / "pipelines" / preset.name).read_bytes() == preset.read_bytes(), preset.name


def test_an_installed_wheel_finds_its_presets(tmp_path):
    # Build from a copy: setuptools writes build/ and egg-info beside pyproject.toml.
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copy(ROOT / "README.md", source)
    shutil.copytree(ROOT / "cfiw_cli", source / "cfiw_cli", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
        check=True,
        timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("cfiw-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"cfiw_cli/presets/{p.name}" for p in (ROOT / "pipelines").glob("*.toml")} <= names

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    # From a directory without a checkout, with the installed copy first on the path.
    probe = (
        "import cfiw_cli, sys; from cfiw_cli.pipeline.loop import load_config, presets; "
        "print(cfiw_cli.__file__); print(sorted(presets())); print(load_config('tiny', None)['model']['id'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    location, names, model = done.stdout.splitlines()
    assert location.startswith(str(site))
    assert names == str(sorted(p.stem for p in (ROOT / "pipelines").glob("*.toml")))
    assert model == "runs/tiny-sft"
