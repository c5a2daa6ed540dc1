"""The results file of a GPU run: JSON lines, appended record by record, so a kill at any moment keeps
everything measured before it.

The first line is the header, then records in the order things happen:
  {"kind": "header", "environment": {...}, "weights": "...", "random_weights": bool, "budget_s": ..., ...}
  {"kind": "row", "test": nodeid, ...}   a benchmark row (bench.harness.measure)
  {"kind": "profile", "test": nodeid, ...}   a case's kernels and their device time (bench_kernel_profile)
  {"kind": "test", "test": nodeid, "tier": ..., "outcome": ..., "reason": ..., "duration_s": ...}
        outcome "started" before a test runs, then passed, failed, skipped, timeout or crashed
  {"kind": "tier", "tier": ..., "status": "done" | "skipped", "reason": ..., "duration_s": ...}
The file appears with its header (written aside, then renamed). Each record after it is one os.write
of one line to the file opened with O_APPEND; `load` ignores a last line without its newline, the only
thing a kill can cut.
"""
import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
ACTIVE_FILE = None  # the file this process appends its records to (set by bench.suite_plugin), or None


def create(path, header: dict):
    """A new results file holding its header, created whole (written aside, then renamed)."""
    path = Path(path)
    staging = path.with_suffix(".partial")
    staging.write_text(json.dumps(dict(kind="header", **header)) + "\n")
    os.replace(staging, path)


def append(path, record: dict):
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)  # on disk before the next record: a killed machine keeps what was measured
    finally:
        os.close(fd)


def record(kind: str, **fields):
    """Append a record to this process's results file, if it has one."""
    if ACTIVE_FILE is not None:
        append(ACTIVE_FILE, dict(kind=kind, **fields))


def load(path) -> dict:
    """{"header", "rows", "profiles", "tests" (nodeid -> its last record, in first-seen order), "tiers"} of a
    results file."""
    text = Path(path).read_text()
    lines = text.split("\n")[:-1]  # drops "" after the last newline, or a cut last line
    loaded = {"header": {}, "rows": [], "profiles": [], "tests": {}, "tiers": []}
    for line in lines:
        entry = json.loads(line)
        kind = entry.pop("kind")
        if kind == "header":
            loaded["header"] = entry
        elif kind == "row":
            loaded["rows"].append(entry)
        elif kind == "profile":
            loaded["profiles"].append(entry)
        elif kind == "test":
            loaded["tests"][entry["test"]] = entry
        elif kind == "tier":
            loaded["tiers"].append(entry)
    return loaded


def commit() -> str:
    """The checkout's commit: $LFM_COMMIT (for copies without .git), else git's (+"-dirty"), else "unknown"."""
    if os.environ.get("LFM_COMMIT"):
        return os.environ["LFM_COMMIT"]
    try:
        run = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO,  # noqa: E731
                                           timeout=10, check=True).stdout.strip()
        head = run("rev-parse", "--short", "HEAD")
        return head + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    """Device, versions and settings that the numbers depend on; the GPU's capability and the kernels'
    fingerprint say which family and which kernels were measured (bench.auto_backend requires both)."""
    import torch
    import triton

    from lfm_kernels.configs import kernels_fingerprint

    on_gpu = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU {platform.processor() or platform.machine()}",
        "capability": list(torch.cuda.get_device_capability()) if on_gpu else None,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "commit": commit(), "kernels_fingerprint": kernels_fingerprint(),
        "cudnn_benchmark": True,  # bench/conftest.py turns it on for every benchmark
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def new_results_path(directory, device: str) -> Path:
    """<directory>/<device>-<date>-<time>.jsonl: a new file per run, so runs never overwrite each other."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    return Path(directory) / f"{slug(device)}-{stamp}.jsonl"
