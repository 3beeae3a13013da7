"""PEP 517 build backend: setuptools', compiling gfl_ops._C against the torch it will run with.

Why: a C++ extension of torch works only with the torch it was compiled against (there is no
stable ABI across torch releases).  A plain ``pip install gfl-ops`` (or ``pip install .``) builds
in an isolated environment; with ``torch`` as a static build requirement pip would put the
*newest* torch on the index there -- 2.15 while the user runs 2.14, say -- and the extension it
makes cannot load into the user's torch (``undefined symbol``; gfl_ops then runs its slow
reference formulas).  This backend instead looks for the torch installed where the package is
being installed and builds against that one, and asks for a torch in the build environment only
when there is none to use.

Where the torch comes from, in order:

1. a torch importable here: ``--no-build-isolation``, or torch already in the build environment;
2. the environment pip installs into: pip's default ("virtual") isolation runs this hook in the
   target interpreter, ``sys.executable``, and hides its site-packages through PYTHONPATH /
   PYTHONNOUSERSITE; a probe of the same interpreter without them finds the target's torch;
3. an activated virtual env or conda env (``VIRTUAL_ENV`` / ``CONDA_PREFIX``): build frontends
   that make a separate venv for the build (uv, pip's ``venv-isolation``) leave no other trace of
   the target;
4. otherwise ``torch>=2.1`` is installed in the build environment, and the wheel then requires
   exactly that torch (setup.py pins it), so pip installs the matching one beside it.

A found torch is used only when it is for this Python (same major.minor).  Its folder is
appended to ``sys.path`` (after the build environment's own, so the build's setuptools wins)
before setup.py runs.  ``GFL_OPS_BUILD_TORCH=isolated`` skips steps 2 and 3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Optional

from setuptools import build_meta as _setuptools

# torch versions gfl-ops supports (pyproject.toml's requirement when none is installed)
TORCH_REQUIREMENT = "torch>=2.1"
_SKIP_PROBE_ENV = "GFL_OPS_BUILD_TORCH"

# run in the probed interpreter: where its torch lives, and which Python it is
_PROBE = (
    "import importlib.util, json, os, sys\n"
    "spec = importlib.util.find_spec('torch')\n"
    "where = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations "
    "else None\n"
    "print(json.dumps({'site': os.path.dirname(where) if where else None,\n"
    "                  'python': list(sys.version_info[:2])}))\n"
)


def _torch_importable_here() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _probe(python: str) -> Optional[str]:
    """The folder that holds ``torch`` for interpreter ``python`` outside the build env, if any."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")
    }
    try:
        result = subprocess.run(
            [python, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120
        )
        found = json.loads(result.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    if found.get("python") != list(sys.version_info[:2]) or not found.get("site"):
        return None
    return found["site"]


def _env_pythons() -> list[str]:
    """Interpreters of the activated virtual / conda environment, if one is active."""
    pythons = []
    for variable in ("VIRTUAL_ENV", "CONDA_PREFIX"):
        prefix = os.environ.get(variable)
        if not prefix:
            continue
        for candidate in (
            os.path.join(prefix, "bin", "python"),
            os.path.join(prefix, "Scripts", "python.exe"),
            os.path.join(prefix, "python.exe"),
        ):
            if os.path.exists(candidate):
                pythons.append(candidate)
                break
    return pythons


def installed_torch_site() -> Optional[str]:
    """The site folder of the torch this build should compile against, when it is not importable
    here already; None when there is none (or the probe is switched off)."""
    if os.environ.get(_SKIP_PROBE_ENV, "").strip().lower() == "isolated":
        return None
    for python in [sys.executable, *_env_pythons()]:
        site = _probe(python)
        if site is not None:
            return site
    return None


def _use_installed_torch() -> bool:
    """Make a torch importable for setup.py; False when a build-env torch must be requested."""
    if _torch_importable_here():
        return True
    site = installed_torch_site()
    if site is None:
        return False
    if site not in sys.path:
        sys.path.append(site)
    print(f"gfl-ops build: compiling against the installed torch in {site}", file=sys.stderr)
    return True


def _requires(extra: list[str]) -> list[str]:
    # setup.py declares no setup_requires, so setuptools' own lists add nothing to running it
    return list(extra) + ([] if _use_installed_torch() else [TORCH_REQUIREMENT])


def get_requires_for_build_wheel(config_settings=None):
    return _requires(["ninja"])


def get_requires_for_build_editable(config_settings=None):
    return _requires(["ninja"])


def get_requires_for_build_sdist(config_settings=None):
    return _requires([])


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _use_installed_torch()
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _use_installed_torch()
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _use_installed_torch()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _use_installed_torch()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    _use_installed_torch()
    return _setuptools.build_sdist(sdist_directory, config_settings)
