"""``python -m bench [--quick] [--json PATH] [--dir DIR] [--only NAME,...]``: see bench/README.md.

Kept light at import time: ``bench.producers`` starts processes with ``spawn``, which
re-imports this module in each of them (as ``__mp_main__``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import sys
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")

# (name, module, rows function) in the order they run; "memory" comes out of "throughput".
MEASUREMENTS: list[tuple[str, str, str]] = [
    ("d2h", "bench.d2h", "rows"),
    ("stall", "bench.stall", "rows"),
    ("job", "bench.job", "rows"),
    ("throughput", "bench.throughput", "rows"),
    ("memory", "bench.throughput", "memory_rows"),
    ("writestage", "bench.writestage", "rows"),
    ("complete", "bench.complete", "rows"),
    ("small", "bench.small", "rows"),
    ("producers", "bench.producers", "rows"),
    ("compress", "bench.compress", "rows"),
    ("peers", "bench.peers", "rows"),
    ("sharded", "bench.sharded", "rows"),
]
# run only when named (``python -m bench peers`` or ``--only peers``): it repeats what the
# others measure against every peer library, minutes on a small machine
OPT_IN = {"peers"}
ALIASES = {"memory": "throughput", "gpu": "d2h", "small_files": "small", "writer": "throughput"}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description="matspool benchmarks (bench/README.md)")
    p.add_argument("what", nargs="*", metavar="NAME", help="measurements to run (same as --only)")
    p.add_argument("--quick", action="store_true", help="small sizes, a few minutes on a 2-core machine")
    p.add_argument(
        "--json",
        default=os.path.join(OUT, "results.json"),
        metavar="PATH",
        help="where to write the results (default: %(default)s)",
    )
    p.add_argument(
        "--dir",
        default=None,
        metavar="DIR",
        help="scratch files go to a fresh run-XXXX directory under DIR, removed at the end "
        f"(default: under {OUT})",
    )
    names = sorted({n for n, _, _ in MEASUREMENTS} | set(ALIASES))
    p.add_argument(
        "--only", default=None, metavar="NAME,...", help=f"run only these measurements: {', '.join(names)}"
    )
    args = p.parse_args(argv)
    if args.what:
        args.only = ",".join([*args.what, *([args.only] if args.only else [])])
    if args.only:
        wanted = {ALIASES.get(n.strip(), n.strip()) for n in args.only.split(",") if n.strip()}
        unknown = wanted - {n for n, _, _ in MEASUREMENTS}
        if unknown:
            p.error(f"unknown measurement(s): {', '.join(sorted(unknown))}; choose from {', '.join(names)}")
        args.only = wanted
    return args


def _status(met: Any) -> str:
    return "-" if met is None else ("met" if met else "MISSED")


def print_table(rows: list[dict[str, Any]], out: Any = sys.stdout) -> None:
    head = ("figure", "measured", "compared with", "ratio", "target", "status")
    body = [
        (
            r["figure"],
            r["measured"],
            r["compared"],
            r["ratio"],
            r["target"],
            "ERROR" if r.get("extra", {}).get("error") else _status(r["met"]),
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    print(line(head), file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for b in body:
        print(line(b), file=out)


def _peers_outputs(doc: dict[str, Any], json_path: str) -> None:
    """The peer table as Markdown and its plots (PNG), next to the JSON."""
    entry = doc["results"].get("peers")
    if not entry or not entry["ok"]:
        return
    from . import peers

    stem = os.path.splitext(os.path.abspath(json_path))[0]
    try:
        files = peers.plot(entry["data"], stem)
    except ImportError as e:
        print(f"no plots: {e} (pip install -e '.[bench]')", file=sys.stderr)
        files = []
    md = peers.markdown(entry["data"])
    with open(stem + "-peers.md", "w") as f:
        f.write(md + "\n")
    print("\n" + md + "\n")
    for path in [stem + "-peers.md", *files]:
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # the package's own imports are deferred to here (see the module docstring)
    from ._util import Config, Progress, Row, env_info, mkdtemp_in, now, rm, settle

    cfg = Config.for_mode(args.quick)
    workdir = mkdtemp_in(os.path.abspath(args.dir) if args.dir else OUT)
    todo = [
        (n, m)
        for n, m, f in MEASUREMENTS
        if f == "rows" and (n in args.only if args.only else n not in OPT_IN)
    ]
    started = _dt.datetime.now().astimezone()
    t0 = now()
    doc: dict[str, Any] = {
        "schema": 1,
        "meta": {
            **env_info(args.quick),
            "started": started.isoformat(timespec="seconds"),
            "argv": sys.argv[1:],
            "workdir": workdir,
            "config": cfg.__dict__,
        },
        "results": {},
        "table": [],
    }
    print(
        f"matspool bench ({'quick' if args.quick else 'full'}): {', '.join(n for n, _ in todo)}; "
        f"scratch in {workdir}",
        file=sys.stderr,
    )
    progress = Progress(len(todo))
    try:
        for name, modname in todo:
            progress.begin(name)
            m0 = now()
            entry: dict[str, Any] = {"ok": False, "error": None}
            try:
                mod = importlib.import_module(modname)
                entry["data"] = mod.run(cfg, workdir, progress)
                entry["ok"] = True
            except Exception as e:  # noqa: BLE001 - one failure must not end the run
                entry["error"] = f"{type(e).__name__}: {e}"
                entry["traceback"] = traceback.format_exc()
                progress.end(f"FAILED: {entry['error']}")
            finally:
                entry["elapsed_s"] = round(now() - m0, 2)
                doc["results"][name] = entry
                # scratch files of a failed step must not pile up
                for child in os.listdir(workdir):
                    rm(os.path.join(workdir, child))
            settle()
    except KeyboardInterrupt:
        print("\ninterrupted; writing what was measured", file=sys.stderr)
        doc["meta"]["interrupted"] = True
    finally:
        rm(workdir)

    rows: list[dict[str, Any]] = []
    for name, modname, fn in MEASUREMENTS:
        owner = ALIASES.get(name, name)
        entry = doc["results"].get(owner)
        if entry is None:
            continue
        if not entry["ok"]:
            if fn == "rows":
                rows.append(
                    Row(
                        figure=f"{name}: failed",
                        measured=entry["error"][:100],
                        met=False,
                        extra={"error": entry["error"]},
                    ).as_dict()
                )
            continue
        try:
            mod = importlib.import_module(modname)
            rows.extend(r.as_dict() for r in getattr(mod, fn)(entry["data"], cfg))
        except Exception as e:  # noqa: BLE001
            rows.append(
                Row(
                    figure=f"{name}: no table row",
                    measured=f"{type(e).__name__}: {e}"[:100],
                    extra={"error": traceback.format_exc()},
                ).as_dict()
            )
    doc["table"] = rows
    finished = _dt.datetime.now().astimezone()
    doc["meta"]["finished"] = finished.isoformat(timespec="seconds")
    doc["meta"]["elapsed_s"] = round(now() - t0, 1)

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")
    _peers_outputs(doc, args.json)
    meta = doc["meta"]
    print(
        f"\nmatspool bench, {meta['mode']} mode, {meta['hostname']}, {meta['cpu_count']} CPUs, "
        f"GPU: {meta['gpu'] or 'none'}, torch {meta['versions'].get('torch')}, "
        f"{meta['elapsed_s']:.0f} s\n"
    )
    print_table(rows)
    met = sum(1 for r in rows if r["met"] is True)
    missed = sum(1 for r in rows if r["met"] is False)
    print(f"\n{met} met, {missed} missed or failed; JSON: {os.path.abspath(args.json)}")
    return 0 if all(e["ok"] for e in doc["results"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
