"""The design card's layout (top-level flows/ tasks/ schemas/) still installs as one package.

A wheel is built from the repository and imported from outside it, so a mapping that only
works in the source tree (or through the editable install) fails here.
"""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = [
    "prefcurate", "prefcurate.data", "prefcurate.inference", "prefcurate.steps",
    "prefcurate.templates", "prefcurate.flows", "prefcurate.tasks", "prefcurate.schemas",
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(REPO)],
        check=True, capture_output=True, cwd=out,
    )
    [built] = out.glob("prefcurate-*.whl")
    return built


def test_the_wheel_holds_every_package_and_its_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PACKAGES:
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    for module in ("flows/build_dataset.py", "tasks/filter.py", "schemas/tables.py"):
        assert f"prefcurate/{module}" in names
    assert "prefcurate/data/critiq_pairs.jsonl" in names
    assert "prefcurate/templates/pairwise_v3.txt" in names
    # the top-level folders are mapped, never shipped as top-level packages of their own
    assert not any(name.startswith(("flows/", "tasks/", "schemas/")) for name in names)


def test_the_wheel_imports_from_outside_the_repository(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import prefcurate.flows.build_dataset as b, prefcurate.tasks.critiq as c, "
        "prefcurate.schemas.tables as t\n"
        "for m in (b, c, t): print(m.__file__)\n"
        "print(c.DEFAULT_HUMAN_PAIRS.is_file(), c.DEFAULT_SEED_CRITERIA.is_file())\n"
    )
    # PYTHONPATH precedes site-packages (and the editable install's finder), so the
    # unpacked wheel is what gets imported
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    *files, data = done.stdout.split("\n")[:4]
    assert all(Path(f).is_relative_to(site) for f in files), files
    assert data == "True True"
