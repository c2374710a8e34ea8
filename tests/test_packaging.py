"""The package builds as a wheel that holds every module, declares OpenRLHF 0.11 as its base, and
installing it beside an existing OpenRLHF leaves torch, deepspeed, transformers and openrlhf alone."""

import json
import os
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTECTED = {"torch", "deepspeed", "transformers", "openrlhf", "flash-attn", "flash_attn"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), REPO], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("openrlhf_sepo-*.whl")
    return str(path)


@pytest.mark.slow
def test_wheel_holds_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    package_files = {
        os.path.relpath(os.path.join(root, f), REPO)
        for root, _, files in os.walk(os.path.join(REPO, "openrlhf_sepo"))
        for f in files if f.endswith(".py")
    }
    assert {"openrlhf_sepo/__init__.py", "openrlhf_sepo/cpu/__main__.py"} <= package_files
    assert package_files <= names, sorted(package_files - names)
    assert not any(n.startswith("tests/") for n in names)  # never shadow OpenRLHF's own top-level `tests`


@pytest.mark.slow
def test_wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "Version: 0.1.0.dev0" in meta
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert any(r.replace(" ", "") in ("openrlhf<0.12,>=0.11.2", "openrlhf>=0.11.2,<0.12") for r in requires), requires
    for r in requires:  # no pins where OpenRLHF pins
        if r.split("[")[0].split(";")[0].strip().startswith(("torch", "deepspeed", "transformers")):
            assert not any(op in r for op in "=<>~"), r


@pytest.mark.slow
def test_install_beside_openrlhf_keeps_its_stack(wheel, tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "-q", "--no-build-isolation",
                           "--report", str(report), wheel], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    installed = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "openrlhf-sepo" in installed
    assert not installed & PROTECTED, installed & PROTECTED
