"""The framework releases each adapter is tested with, and what importing it says outside them.

``scripts/check_framework_versions.py`` (``make test-versions``, part of ``make test``) runs each
adapter's test file against every release listed here; the newest of each is the one pinned in
requirements-dev.txt, which the main test suite runs.  docs/framework-versions.md has the
results.  tests/integrations/test_framework_versions.py keeps this list, the script's matrix
and the pins in agreement.
"""

from __future__ import annotations

import re
import warnings

# oldest first
TESTED: dict[str, tuple[str, ...]] = {
    "mmdet": ("3.0.0", "3.1.0", "3.2.0", "3.3.0"),
    "ultralytics": ("8.3.100", "8.3.253", "8.4.0", "8.4.100", "8.4.190"),
}


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: "8.4.190" -> (8, 4, 190); "3.0.0rc6" ->
    (3, 0, 0) (pre-release and local parts ignored)."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def tested_range(framework: str) -> str:
    versions = TESTED[framework]
    return f"{versions[0]} to {versions[-1]}"


def warn_if_older_than_tested(framework: str, version: str) -> None:
    """A warning (not an error: the adapter may well work) when ``version`` predates every
    tested release.  Newer releases pass silently: they are the common case and are added to
    the tests as they come."""
    if release(version) < release(TESTED[framework][0]):
        warnings.warn(
            f"gfl_ops.integrations.{framework}: {framework} {version} is older than any release "
            f"this adapter is tested with ({tested_range(framework)}; "
            "docs/framework-versions.md); upgrade if something fails",
            stacklevel=3,
        )


def unsupported(framework: str, version: str, err: ImportError) -> ImportError:
    """The error to raise when the adapter cannot import what it needs from ``framework``."""
    return ImportError(
        f"gfl_ops.integrations.{framework} cannot run with {framework} {version}: {err}.  It is "
        f"tested with {framework} {tested_range(framework)} (docs/framework-versions.md)"
    )
