"""Run the adapters' tests against older mmdetection and Ultralytics releases (``make
test-versions``; ``make test`` runs it after the suite).

Why: the suite runs each adapter against the release pinned in requirements-dev.txt, but users
bring the release they have, and the adapters build on framework internals (Ultralytics' loss,
trainer and validator classes; mmdet's loss modules and ``weight_reduce_loss``) that change from
release to release.  Each entry of MATRIX below is installed over the project's venv (``pip
install --no-deps --target``, put first on ``PYTHONPATH``: the venv's torch, the build and
everything else stay) and the adapter's whole test files run against it.  Where a release's own
requirements exclude the venv's version of a dependency (Ultralytics 8.3.100 pins
``numpy<=2.1.1``), that dependency is installed alongside at a version the release accepts.

Outcome: a failed test fails the script; a skipped test fails it unless the entry names the
reason as expected (a model that the release does not have yet).  ``--report PATH`` writes the
table (docs/framework-versions.md) with the versions, torch, Python and commit it ran with.

    python scripts/check_framework_versions.py [--only ultralytics] \
        [--report docs/framework-versions.md]

Targets are cached under ``.venv/framework-versions/`` (one folder per entry).  The releases
listed here and in :data:`gfl_ops.integrations._versions.TESTED` must agree (a test checks it).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks.csvio (run as a script, only scripts/ is on the path)
CACHE = REPO / ".venv" / "framework-versions"
TEST_FILES = {
    "mmdet": ("tests/integrations/test_mmdet.py", "tests/integrations/test_mmdet_detectors.py"),
    "ultralytics": ("tests/integrations/test_ultralytics.py",),
}
# what a release predating a model legitimately skips (the pinned release runs those tests)
NO_YOLO26 = r"has no YOLO26"
# what a release whose own feature is broken skips: the stock tuner of 8.3.2xx-8.4.0 fails
# every trial (checked by the test, not assumed)
TUNER_BROKEN = r"own tuner fails every trial"
# releases whose multi-GPU worker imports its trainer class by name (up to 8.4.100) cannot start
# a class defined in the user's script, stock or fused
BY_NAME_WORKER = r"DDP worker imports the trainer class by name"


@dataclass(frozen=True)
class Entry:
    framework: str
    version: str
    # installed with it: dependencies whose venv version the release's own requirements exclude
    extra: tuple[str, ...] = ()
    expected_skips: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.framework}-{self.version}"

    @property
    def pins(self) -> list[str]:
        return [f"{self.framework}=={self.version}", *self.extra]


# The releases pinned in requirements-dev.txt (mmdet 3.3.0, ultralytics 8.4.190) run in the main
# suite and are not repeated here.
MATRIX = (
    # mmdet 3.0 / 3.1 accept mmcv < 2.1 (the venv has mmcv-lite 2.1.0); 3.0 with the mmengine of
    # its time, whose Runner formats its config with yapf's pre-0.40.2 API
    Entry(
        "mmdet",
        "3.0.0",
        (
            "mmcv-lite==2.0.1",
            "mmengine==0.7.4",
            "yapf==0.40.1",
            "importlib-metadata==7.0.1",
            "zipp==3.17.0",
            "tomli==2.0.1",
        ),
    ),
    Entry("mmdet", "3.1.0", ("mmcv-lite==2.0.1",)),
    Entry("mmdet", "3.2.0"),
    # 8.3.100 requires numpy <= 2.1.1 (and uses np.trapz, which NumPy 2.4 removed) and pandas
    Entry(
        "ultralytics",
        "8.3.100",
        ("numpy==2.1.1", "pandas==2.2.3", "pytz", "tzdata"),
        (NO_YOLO26, BY_NAME_WORKER),
    ),
    Entry("ultralytics", "8.3.253", (), (NO_YOLO26, TUNER_BROKEN, BY_NAME_WORKER)),
    Entry("ultralytics", "8.4.0", (), (TUNER_BROKEN, BY_NAME_WORKER)),
    Entry("ultralytics", "8.4.100", (), (BY_NAME_WORKER,)),
)


@dataclass
class Outcome:
    entry: Entry
    passed: int = 0
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        unexpected = [
            s for s in self.skipped if not any(re.search(p, s) for p in self.entry.expected_skips)
        ]
        return not (self.failed or unexpected or self.error) and self.passed > 0


def install(entry: Entry) -> Path:
    """The entry's packages in a target folder of their own (cached; redone if the pins
    change)."""
    target = CACHE / entry.name
    stamp = target / ".pins"
    if stamp.exists() and stamp.read_text() == "\n".join(entry.pins):
        return target
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
        + entry.pins,
        check=True,
    )
    stamp.write_text("\n".join(entry.pins))
    return target


def run(entry: Entry) -> Outcome:
    outcome = Outcome(entry)
    started = time.perf_counter()
    try:
        target = install(entry)
    except subprocess.CalledProcessError as exc:
        outcome.error = f"install failed: {exc}"
        return outcome
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider"]
        + list(TEST_FILES[entry.framework]),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    outcome.seconds = time.perf_counter() - started
    out = proc.stdout + proc.stderr
    # pytest's summary, its last line: "31 passed, 1 skipped, 6 warnings in 23.69s"
    summaries = re.findall(r"^=*\s*(\d+ \w+.* in [\d.]+s)\b.*$", out, re.M)
    summary = summaries[-1] if summaries else ""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped)", summary)}
    outcome.passed = counts.get("passed", 0)
    outcome.skipped = re.findall(r"^SKIPPED \[\d+\] (.*)$", out, re.M)
    outcome.failed = re.findall(r"^(?:FAILED|ERROR) (.*)$", out, re.M)
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and not outcome.failed):
        outcome.error = f"pytest exit {proc.returncode}: " + out.strip()[-1500:]
    return outcome


def installed_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def report(outcomes: list[Outcome]) -> str:
    import torch

    from benchmarks.csvio import git_commit
    from gfl_ops.integrations._versions import TESTED

    commit, dirty = git_commit()
    commit = commit[:7] + (" (with uncommitted changes)" if dirty == "yes" else "")
    tested = "; ".join(f"{name} {', '.join(versions)}" for name, versions in TESTED.items())
    lines = [
        "# Framework releases the adapters are tested with",
        "",
        "Written by `python scripts/check_framework_versions.py --report "
        "docs/framework-versions.md` (`make test-versions`; `make test`, hence CI, runs the same "
        "check without writing this file).  Each row: the adapter's whole test files run against "
        "that release, installed over the project's venv.  The pinned releases "
        f"(mmdet {installed_version('mmdet')}, mmengine {installed_version('mmengine')}, "
        f"mmcv-lite {installed_version('mmcv-lite')}; ultralytics "
        f"{installed_version('ultralytics')}) are the main suite's.",
        "",
        f"Tested releases (gfl_ops/integrations/_versions.py): {tested}.  Importing an "
        "adapter with an older release warns; one without the internals it builds on raises an "
        "ImportError naming the release and this range.  Ultralytics before 8.3.100 is not in "
        "the matrix: 8.3.0 requires numpy < 2, which this torch and onnx are not built for.",
        "",
        f"Ran at commit {commit} with Python {platform.python_version()}, torch "
        f"{torch.__version__}, numpy {installed_version('numpy')} (unless the row installs "
        "another), on the CPU.",
        "",
        "| framework | release (and what it installs beside) | passed | skipped (why) | failed | "
        "seconds |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        beside = f" ({', '.join(o.entry.extra)})" if o.entry.extra else ""
        skipped = "; ".join(sorted(set(s.split(": ", 1)[-1] for s in o.skipped))) or "-"
        lines.append(
            f"| {o.entry.framework} | {o.entry.version}{beside} | {o.passed} | "
            f"{len(o.skipped)}{' (' + skipped + ')' if o.skipped else ''} | "
            f"{len(o.failed) or (o.error and 'error') or 0} | {o.seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=sorted(TEST_FILES), help="one framework's releases")
    ap.add_argument("--report", type=Path, help="write the markdown table here")
    args = ap.parse_args(argv)
    outcomes = []
    for entry in MATRIX:
        if args.only and entry.framework != args.only:
            continue
        print(f"== {entry.name}: {' '.join(entry.pins)}", flush=True)
        outcome = run(entry)
        outcomes.append(outcome)
        status = "ok" if outcome.ok else "FAILED"
        print(
            f"   {status}: {outcome.passed} passed, {len(outcome.skipped)} skipped, "
            f"{len(outcome.failed)} failed in {outcome.seconds:.0f} s",
            flush=True,
        )
        for line in outcome.failed + outcome.skipped + ([outcome.error] if outcome.error else []):
            print(f"   {line}", flush=True)
    if args.report:
        args.report.write_text(report(outcomes))
        print(f"wrote {args.report}")
    bad = [o.entry.name for o in outcomes if not o.ok]
    if bad:
        print(f"framework versions: FAILED for {', '.join(bad)}", file=sys.stderr)
        return 1
    print(f"framework versions: all {len(outcomes)} releases ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
