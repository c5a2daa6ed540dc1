"""Which path backend="auto" takes on a GPU family, from a GPU run's results.

    python -m bench.auto_backend RESULTS.jsonl [RESULTS.jsonl ...] [--family sm90] [--earlier-kernels] [--table PATH]

Reads the op rows of `make gpu-suite` results (bench/results/*.jsonl): for each op, mode (forward:
"inference", forward+backward: "training") and dtype, the `triton` and `eager` medians at the largest batch
measured; where eager (the cuDNN composition) was faster, backend="auto" runs the torch backend for that op
on that family (lfm_kernels.configs.auto_choice). Updates lfm_kernels/auto_backend.json (or --table): its
choices for what these results measured are replaced, the others (earlier runs' evidence) kept, and the
fingerprints of the kernels measured added. Results of other kernels than these are refused unless
--earlier-kernels says to take them as the latest evidence until these kernels are measured: the default path
then keeps the cuDNN composition wherever earlier kernels were slower (it never ships slower than what the
user had). The family comes from the results' header (its capability), else --family.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.shapes import SNET_BLOCKS
from lfm_kernels.configs import AUTO_TABLE, FAMILIES, kernels_fingerprint

MODES = {"forward": "inference", "forward+backward": "training"}


def op_key(op: str) -> str:
    """The op's name in configs.auto_choice: SNet blocks by their input channels (each block its own shape)."""
    if op.startswith("snet_block") and op[len("snet_block"):].isdigit():
        return f"snet_block/cin={SNET_BLOCKS[int(op[len('snet_block'):])][0]}"
    return op


def fingerprint_at(commit: str) -> str:
    """kernels_fingerprint() of lfm_kernels as it was at `commit` (from git), for results without one."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    names = subprocess.run(["git", "ls-tree", "--name-only", commit, "lfm_kernels/"], cwd=root, check=True,
                           capture_output=True, text=True).stdout.split()
    digest = hashlib.sha256()
    for name in sorted(n for n in names if n.endswith(".py")):
        source = subprocess.run(["git", "show", f"{commit}:{name}"], cwd=root, check=True, capture_output=True).stdout
        digest.update(Path(name).name.encode() + b"\0" + source)
    return digest.hexdigest()[:16]


def entry_key(entry: dict) -> tuple:
    """What a choice is for: configs.auto_choice's arguments."""
    return entry["family"], entry["op"], entry["mode"], entry["dtype"]


def choices(rows: list[dict], family: str) -> list[dict]:
    """One entry per (op, mode, dtype) measured with both providers, at its largest batch."""
    best = {}
    for row in rows:
        if row.get("kind") != "row" or row.get("provider") not in ("triton", "eager") or row["mode"] not in MODES:
            continue
        key = (op_key(row["op"]), MODES[row["mode"]], row["dtype"])
        batch = best.setdefault(key, {}).get("batch", -1)
        if row["batch"] > batch:
            best[key] = {"batch": row["batch"]}
        if row["batch"] >= batch:
            best[key][row["provider"]] = row["median_s"]
    entries = []
    for (op, mode, dtype), measured in sorted(best.items()):
        if "triton" in measured and "eager" in measured:
            speedup = measured["eager"] / measured["triton"]
            entries.append({"family": family, "op": op, "mode": mode, "dtype": dtype, "batch": measured["batch"],
                            "speedup": round(speedup, 3), "backend": "triton" if speedup >= 1 else "torch"})
    return entries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.auto_backend", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--family", choices=FAMILIES, help="GPU family, where the header does not say")
    parser.add_argument("--earlier-kernels", action="store_true",
                        help="take results of other kernels than these as the latest evidence")
    parser.add_argument("--table", type=Path, default=AUTO_TABLE, help=f"the table to update (default {AUTO_TABLE})")
    args = parser.parse_args(argv)
    entries, current, measured_on = [], kernels_fingerprint(), set()
    for path in args.results:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        header = next((r for r in rows if r.get("kind") == "header"), {})
        env = header.get("environment", {})
        measured = env.get("kernels_fingerprint") or fingerprint_at(env.get("commit", "HEAD"))
        if measured != current and not args.earlier_kernels:
            print(f"auto_backend: {path} measured other kernels (fingerprint {measured}, these are {current}); "
                  "run the GPU suite on this code, or pass --earlier-kernels", file=sys.stderr)
            return 2
        measured_on.add(measured)
        capability = env.get("capability")
        family = ("sm90" if capability[0] >= 9 else "sm80") if capability else args.family
        if family is None:
            print(f"auto_backend: {path} does not say its GPU's capability; pass --family", file=sys.stderr)
            return 2
        entries += choices(rows, family)
    earlier = json.loads(args.table.read_text()) if args.table.exists() else {"measured_fingerprints": [],
                                                                              "entries": []}
    remeasured = {entry_key(e) for e in entries}
    kept = [e for e in earlier["entries"] if entry_key(e) not in remeasured]
    table = {"measured_fingerprints": sorted(set(earlier["measured_fingerprints"]) | measured_on),
             "entries": sorted(kept + entries, key=entry_key)}
    args.table.write_text(json.dumps(table, indent=1) + "\n")
    slower = [e for e in table["entries"] if e["backend"] == "torch"]
    print(f"wrote {args.table}: {len(entries)} choices measured, {len(kept)} kept from earlier runs; "
          f"the cuDNN composition for {len(slower)}")
    for e in slower:
        print(f"  {e['family']} {e['op']} {e['mode']} {e['dtype']}: ours {e['speedup']:.2f}x of eager")
    return 0


if __name__ == "__main__":
    sys.exit(main())
