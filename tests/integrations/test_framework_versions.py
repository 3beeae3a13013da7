"""The framework releases the adapters claim, and what importing an adapter says outside them.

* gfl_ops/integrations/_versions.py's TESTED, scripts/check_framework_versions.py's MATRIX (run
  by ``make test`` after the suite) and requirements-dev.txt's pins name the same releases: the
  newest of each framework is the pinned one, which this suite runs; the older ones are the
  script's.
* An older release than any tested warns at import; one that lacks what the adapter imports
  raises an ImportError naming the release and the tested range (simulated on the installed
  release, in a fresh interpreter: its version string set back, a module or class taken away).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from gfl_ops.integrations import _versions

REPO = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location(
        "check_framework_versions", REPO / "scripts" / "check_framework_versions.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def test_tested_releases_agree_with_the_matrix_and_the_pins() -> None:
    script = load_script()
    pins = dict(
        re.findall(r"^([\w-]+)==([\w.]+)", (REPO / "requirements-dev.txt").read_text(), re.M)
    )
    for framework, releases in _versions.TESTED.items():
        assert list(releases) == sorted(releases, key=_versions.release), framework
        # the newest is the pinned release the suite runs (and what is installed here)
        assert releases[-1] == pins[framework] == version(framework)
        in_matrix = [e.version for e in script.MATRIX if e.framework == framework]
        assert in_matrix == list(releases[:-1]), framework


def test_release_parsing() -> None:
    assert _versions.release("8.4.190") == (8, 4, 190)
    assert _versions.release("3.0.0rc6") == (3, 0, 0)
    assert _versions.release("2.1.0+cu130") == (2, 1, 0)
    assert _versions.release("8.3.99") < _versions.release("8.3.100")


def run_python(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "YOLO_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


ULTRALYTICS_PRELUDE = (
    "import os, tempfile, warnings\n"
    "os.environ['YOLO_CONFIG_DIR'] = tempfile.mkdtemp()\n"
    "import ultralytics, ultralytics.utils.loss\n"
)


def test_ultralytics_older_than_tested_warns() -> None:
    out = run_python(
        ULTRALYTICS_PRELUDE + "ultralytics.__version__ = '8.2.103'\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import gfl_ops.integrations.ultralytics as adapter\n"
        "print([str(w.message) for w in caught if 'gfl_ops' in str(w.message)])\n"
        "print(adapter.patch.__name__)\n"
    )
    assert "ultralytics 8.2.103 is older than any release" in out
    assert _versions.tested_range("ultralytics") in out and "patch" in out


def test_ultralytics_without_the_internals_raises_a_clear_import_error() -> None:
    out = run_python(
        ULTRALYTICS_PRELUDE + "ultralytics.__version__ = '8.1.0'\n"
        "del ultralytics.utils.loss.DFLoss  # (added in 8.2)\n"
        "warnings.simplefilter('ignore')\n"
        "try:\n"
        "    import gfl_ops.integrations.ultralytics\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    assert "ImportError: gfl_ops.integrations.ultralytics cannot run with ultralytics 8.1.0" in out
    assert "DFLoss" in out and _versions.tested_range("ultralytics") in out


@pytest.mark.parametrize("mmdet_version", ["2.28.2", "3.3.0"])
def test_mmdet_without_the_internals_raises_a_clear_import_error(mmdet_version: str) -> None:
    """mmdetection 2.x has no mmdet.registry; simulated by blocking that module."""
    out = run_python(
        "import sys, warnings\n"
        "sys.path.insert(0, 'tests/integrations')\n"
        "import mmcv_ext_stub; mmcv_ext_stub.install()\n"
        f"import mmdet; mmdet.__version__ = '{mmdet_version}'\n"
        "sys.modules['mmdet.registry'] = None\n"
        "warnings.simplefilter('ignore')\n"
        "try:\n"
        "    import gfl_ops.integrations.mmdet\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    assert f"ImportError: gfl_ops.integrations.mmdet cannot run with mmdet {mmdet_version}" in out
    assert "mmdet.registry" in out and _versions.tested_range("mmdet") in out
