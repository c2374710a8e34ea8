"""The package's layering, as pyproject.toml's [tool.importlinter] contracts state it, checked by import-linter.

The contracts: cli/ is the front door (nothing below imports it, and a cli module imports no other cli module but
``common``); the benchmark harness sits above the library; each method's rooms import no other method's; no import
cycle; and every module is placed in a layer (exhaustive), so a new module must be given its room.
"""

import os
import re
import shutil
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(REPO, "pyproject.toml")


def _lint(config, cwd):
    from importlinter.cli import lint_imports

    here, path = os.getcwd(), list(sys.path)
    os.chdir(cwd)  # lint_imports puts the working directory first on sys.path
    try:
        return lint_imports(config_filename=config, no_cache=True, no_logo=True)
    finally:
        os.chdir(here)
        sys.path[:] = path


def test_the_package_keeps_every_contract():
    assert _lint(PYPROJECT, REPO) == 0


def _probe_package(tmp_path):
    """A copy of the package and its contracts under another name (the real one is already imported here)."""
    shutil.copytree(os.path.join(REPO, "openrlhf_sepo"), tmp_path / "layering_probe",
                    ignore=shutil.ignore_patterns("__pycache__", "*.json"))
    for path in (tmp_path / "layering_probe").rglob("*.py"):
        path.write_text(path.read_text().replace("openrlhf_sepo", "layering_probe"))
    with open(PYPROJECT) as f:
        config = f.read()
    (tmp_path / "pyproject.toml").write_text(config.replace("openrlhf_sepo", "layering_probe"))
    return tmp_path / "layering_probe"


@pytest.mark.parametrize("module, bad_import", [
    ("rows.py", "import layering_probe.cli.common"),  # the library climbing into cli/
    ("cli/train_sepo.py", "import layering_probe.cli.evaluate"),  # a front door using another front door
    ("cli/regime_map.py", "import layering_probe.cli.demo"),  # the regime map's door is one too
    ("testbed.py", "import layering_probe.bench"),  # the testbed (library) using the harness
    ("tkpo_data.py", "import layering_probe.token_rm_data"),  # one method using another's room
    ("scoring.py", "import layering_probe.bench"),  # the library using the harness
])
def test_a_broken_rule_fails_the_check(tmp_path, module, bad_import):
    package = _probe_package(tmp_path)
    assert _lint(str(tmp_path / "pyproject.toml"), str(tmp_path)) == 0  # the unmodified copy passes
    path = package / module
    text = path.read_text()
    # After the module docstring, so the import is a real module-level one.
    path.write_text(re.sub(r'^("""[\s\S]*?"""\n)', lambda m: m.group(1) + bad_import + "\n", text, count=1))
    assert bad_import in path.read_text()
    assert _lint(str(tmp_path / "pyproject.toml"), str(tmp_path)) != 0


def test_a_module_without_a_layer_fails_the_check(tmp_path):
    package = _probe_package(tmp_path)
    (package / "unplaced.py").write_text('"""A new module nobody gave a room."""\n')
    assert _lint(str(tmp_path / "pyproject.toml"), str(tmp_path)) != 0
