#!/usr/bin/python3
"""How block jobs scale with the disk: livesnapd vs qemu-storage-daemon (qsd).

For raw disks of each size (--sizes, default 1, 4 and 16 GiB), sparse (--data,
64 MiB of random data spread evenly in 1 MiB extents) and full (random data;
--full-max caps the full sizes, and a full size is skipped when /tmp has not
room for it and its target), plus a large sparse row (--big, 64 GiB), with an
idle guest: the time of `blockdev-backup sync=full` (start to
BLOCK_JOB_COMPLETED) and of `blockdev-mirror sync=full` (start to
BLOCK_JOB_READY, then a soft block-job-cancel, to the job's end event), the
daemon's peak RSS (VmHWM) and its RSS growth over the job, and the dirty
bitmap the job keeps (query-block's dirty-bitmaps, granularity and size ->
bytes, where the daemon lists it). Every job runs in a fresh daemon configured
over QMP the same way; the daemons alternate per row.

Copy rate (--rate-size, 1 GiB full): the same jobs against `dd iflag=direct
oflag=direct bs=1M` with cache.direct=on, and against `cp --reflink=never`
(copy_file_range) with the page cache, measured in the same run, with the CPU
time (user + system) the daemon spent on the job: what a guest on the same
cores loses to it.

Daemons: qsd, livesnapd (--livesnapd-bin, default the worktree's release
build) and, with --before-bin (a release build of an earlier commit), the pre-issue
build as a third column.

Usage:
  bench/scaling.py [--sizes 1G,4G,16G] [--big 64G] [--data 64M] [--full-max 16G]
                   [--rate-size 1G] [--repeat N] [--cache writeback|direct]
                   [--before-bin PATH] [--out FILE]
Needs what bench/jobs.py needs (qemu-utils, a release livesnapd); it borrows
that script's QMP client and daemon handling.
"""

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jobs  # noqa: E402  (the sibling benchmark: QMP client, daemons)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
GiB = 1 << 30
EXTENT = MiB
CAP = 600.0


def status_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def make_source(path, size, kind, data):
    """A raw image: `data` bytes of random data in 1 MiB extents spread evenly
    over a sparse file, or random data throughout (a 64 MiB random block
    repeated: copying cannot tell)."""
    block = os.urandom(64 * MiB)
    with open(path, "wb") as f:
        f.truncate(size)
        if kind == "sparse":
            n = max(1, data // EXTENT)
            stride = size // n // EXTENT * EXTENT
            for i in range(n):
                f.seek(i * stride)
                f.write(block[(i % 64) * EXTENT:(i % 64 + 1) * EXTENT])
        else:
            for off in range(0, size, len(block)):
                f.write(block[:min(len(block), size - off)])
        f.flush()
        os.fsync(f.fileno())


def new_target(path, size):
    if os.path.exists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.truncate(size)


def bitmap_bytes(q, size):
    """Bytes of the dirty bitmaps query-named-block-nodes lists on any node
    (qsd shows a job's own bitmap on its filter node); None if none."""
    try:
        blocks = q.cmd("query-named-block-nodes", timeout=5) or []
    except jobs.QMPError:
        blocks = []
    total = None
    for b in blocks:
        for bm in b.get("dirty-bitmaps") or []:
            g = bm.get("granularity")
            if g:
                total = (total or 0) + (size + g - 1) // g // 8
    return total


def add_node(d, node, path):
    """A raw node over a file, with discard=unmap: without it qsd's write-zeroes
    allocates (fallocate ZERO_RANGE) and a 64 GiB sparse copy needs 64 GiB of
    disk; livesnapd punches holes either way."""
    cache = {"direct": d.cache_direct, "no-flush": False}
    d.qmp.cmd("blockdev-add", {"driver": "raw", "node-name": node, "cache": cache,
                               "discard": "unmap",
                               "file": {"driver": "file", "filename": path, "cache": cache,
                                        "discard": "unmap"}}, timeout=30)


def run_job(d, kind, size):
    """One job on a started daemon with nodes src and dst; returns its figures."""
    q = d.qmp
    pid = d.proc.pid
    rss0 = status_kib(pid, "VmRSS")
    cpu0 = jobs.cpu_seconds(pid)
    args = {"job-id": "job0", "device": "src", "target": "dst", "sync": "full"}
    t0 = time.monotonic()
    q.cmd("blockdev-backup" if kind == "backup" else "blockdev-mirror", args, timeout=30)
    bitmap = bitmap_bytes(q, size)
    end = None
    ready = None
    err = None
    while end is None:
        left = t0 + CAP - time.monotonic()
        if left <= 0:
            q.cmd("block-job-cancel", {"device": "job0", "force": True}, timeout=10)
            err = f"did not finish in {CAP:.0f} s"
            break
        ev = q.next_event(left)
        if ev is None:
            if q.closed:
                err = "daemon died"
                break
            continue
        _, msg = ev
        data = msg.get("data", {})
        if data.get("device") != "job0":
            continue
        if msg["event"] == "BLOCK_JOB_READY" and ready is None:
            ready = time.monotonic() - t0
            q.cmd("block-job-cancel", {"device": "job0"}, timeout=10)
        elif msg["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            end = time.monotonic() - t0
            err = data.get("error")
    cpu1 = jobs.cpu_seconds(pid)
    return {"time": end if not err else None, "ready": ready, "error": err,
            "cpu": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
            "hwm_kib": status_kib(pid, "VmHWM"),
            "rss_delta_kib": (status_kib(pid, "VmHWM") or 0) - (rss0 or 0),
            "bitmap": bitmap}


def one(slot, binary, kind, work, src, size, job, cache_direct):
    tgt = os.path.join(work, "dst.img")
    new_target(tgt, size)
    d = jobs.Daemon(slot, "qsd" if slot == "qsd" else "livesnapd", binary, work, slot,
                    cache_direct, None)
    try:
        d.start()
        for node, path in (("src", src), ("dst", tgt)):
            add_node(d, node, path)
        r = run_job(d, job, size)
    except (jobs.QMPError, jobs.QMPTimeout, jobs.QMPClosed, RuntimeError) as e:
        r = {"time": None, "error": str(e), "hwm_kib": None, "rss_delta_kib": None,
             "bitmap": None}
    finally:
        d.stop()
        os.unlink(tgt)
    jobs.log(f"{slot} {kind} {size >> 30}G {job}: {r}")
    return r


def timed(argv):
    t0 = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, timeout=CAP)
    return time.monotonic() - t0


def fmt_t(r):
    if r is None:
        return "–"
    return f"{r['time']:.2f}" if r.get("time") is not None else f"failed ({r.get('error')})"


def fmt_mib(kib):
    return "–" if kib is None else f"{kib / 1024:.0f}"


def fmt_bitmap(b):
    if b is None:
        return "–"
    return f"{b / 1024:.0f} KiB" if b >= 1024 else f"{b} B"


def ratio(a, b):
    if not a or not b or a.get("time") is None or b.get("time") is None or not b["time"]:
        return "–"
    return f"{a['time'] / b['time']:.2f}"


def best(rs):
    ok = [r for r in rs if r.get("time") is not None]
    return min(ok, key=lambda r: r["time"]) if ok else (rs[0] if rs else None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1G,4G,16G")
    ap.add_argument("--big", default="64G", help="extra sparse-only size ('' for none)")
    ap.add_argument("--data", default="64M", help="data in a sparse disk")
    ap.add_argument("--full-max", default="16G", help="largest full disk")
    ap.add_argument("--rate-size", default="1G", help="copy-rate row size ('' for none)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell (best kept)")
    ap.add_argument("--cache", default="writeback", choices=["writeback", "direct"],
                    help="cache mode of the scaling rows")
    ap.add_argument("--livesnapd-bin", default=os.path.join(ROOT, "target/release/livesnapd"))
    ap.add_argument("--before-bin", default=None, help="pre-issue livesnapd, a third column")
    ap.add_argument("--qsd-bin", default=shutil.which("qemu-storage-daemon") or "qemu-storage-daemon")
    ap.add_argument("--workdir", default=None, help="where images go (default: a dir in /tmp)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    slots = [("qsd", args.qsd_bin), ("livesnapd", args.livesnapd_bin)]
    if args.before_bin:
        slots.append(("before", args.before_bin))
    data = jobs.parse_size(args.data)
    full_max = jobs.parse_size(args.full_max)
    rows = [(jobs.parse_size(s), k) for s in args.sizes.split(",") if s for k in ("sparse", "full")]
    if args.big:
        rows.append((jobs.parse_size(args.big), "sparse"))
    work = tempfile.mkdtemp(prefix="scaling-", dir=args.workdir)
    loads = [os.getloadavg()[0]]
    results = []
    notes = []
    try:
        for size, kind in rows:
            if kind == "full" and size > full_max:
                notes.append(f"{size >> 30} GiB full skipped (--full-max {args.full_max})")
                continue
            free = shutil.disk_usage(work).free
            if kind == "full" and free < 2 * size + GiB:
                notes.append(f"{size >> 30} GiB full skipped: {free >> 30} GiB free in {work}, "
                             f"needs {2 * size + GiB >> 30}")
                continue
            src = os.path.join(work, "src.img")
            jobs.log(f"making {kind} source of {size >> 30} GiB")
            make_source(src, size, kind, data)
            for job in ("backup", "mirror"):
                cell = {s: [] for s, _ in slots}
                for rep in range(args.repeat):
                    order = slots if (len(results) + rep) % 2 == 0 else list(reversed(slots))
                    for slot, binary in order:
                        cell[slot].append(one(slot, binary, kind, work, src, size, job,
                                              args.cache == "direct"))
                        loads.append(os.getloadavg()[0])
                results.append((size, kind, job, {s: best(rs) for s, rs in cell.items()}))
            os.unlink(src)
        rate = []
        if args.rate_size:
            size = jobs.parse_size(args.rate_size)
            src = os.path.join(work, "src.img")
            make_source(src, size, "full", data)
            dst = os.path.join(work, "copy.img")
            for cache, tool in (("direct", "dd"), ("writeback", "cp")):
                for job in ("backup", "mirror"):
                    cell = {s: [] for s, _ in slots}
                    tools = []
                    for rep in range(args.repeat):
                        if tool == "dd":
                            new_target(dst, size)
                            argv = ["dd", f"if={src}", f"of={dst}", "bs=1M", "iflag=direct",
                                    "oflag=direct", "conv=notrunc,fsync"]
                        else:
                            argv = ["sh", "-c", f"cp --reflink=never {src} {dst} && sync {dst}"]
                        tools.append(timed(argv))
                        os.unlink(dst)
                        for slot, binary in slots:
                            cell[slot].append(one(slot, binary, "full", work, src, size, job,
                                                  cache == "direct"))
                        loads.append(os.getloadavg()[0])
                    rate.append((size, cache, tool, job, min(tools),
                                 {s: best(rs) for s, rs in cell.items()}))
            os.unlink(src)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = []
    lines.append(f"Machine: {platform.node()}, {os.cpu_count()} cores, {platform.platform()}; "
                 f"{jobs.daemon_version('qsd', args.qsd_bin)}; load average {min(loads):.1f}–"
                 f"{max(loads):.1f} during the run")
    lines.append(f"Raw source and target on {args.workdir or tempfile.gettempdir()}, "
                 f"cache {args.cache}; sparse = {data >> 20} MiB of data in 1 MiB extents "
                 f"spread evenly; idle guest; best of {args.repeat}. Mirror: to READY, then a "
                 "soft cancel. Ratio = livesnapd / qsd (lower is faster).")
    lines.append("")
    names = [s for s, _ in slots]
    if not results:
        lines = lines[:1]
    head = ["disk", "job"] + [f"{s} s" for s in names] + ["ratio"]
    head += [f"{s} peak RSS MiB" for s in names] + [f"{s} RSS growth MiB" for s in names]
    head += [f"{s} bitmap" for s in names]
    if results:
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
    for size, kind, job, cell in results:
        row = [f"{size >> 30} GiB {kind}", job] + [fmt_t(cell[s]) for s in names]
        row.append(ratio(cell["livesnapd"], cell["qsd"]))
        row += [fmt_mib(cell[s] and cell[s].get("hwm_kib")) for s in names]
        row += [fmt_mib(cell[s] and cell[s].get("rss_delta_kib")) for s in names]
        row += [fmt_bitmap(cell[s] and cell[s].get("bitmap")) for s in names]
        lines.append("| " + " | ".join(row) + " |")
    if rate:
        lines.append("")
        lines.append("Copy rate, 1 GiB full, idle guest: job rate / tool rate in the same run "
                     "(target: ≥ 0.9 × dd O_DIRECT with cache.direct; near cp with the page cache).")
        lines.append("")
        head = ["cache", "job", "tool", "tool MiB/s"] + [f"{s} MiB/s" for s in names]
        head += [f"{s} / tool" for s in names] + [f"{s} CPU s" for s in names]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|")
        for size, cache, tool, job, t_tool, cell in rate:
            mib = size / MiB
            row = [cache, job, tool, f"{mib / t_tool:.0f}"]
            rates = [(mib / cell[s]["time"]) if cell[s] and cell[s].get("time") else None
                     for s in names]
            row += ["–" if r is None else f"{r:.0f}" for r in rates]
            row += ["–" if r is None else f"{r / (mib / t_tool):.2f}" for r in rates]
            row += ["–" if not cell[s] or cell[s].get("cpu") is None else f"{cell[s]['cpu']:.2f}"
                    for s in names]
            lines.append("| " + " | ".join(row) + " |")
    for n in notes:
        lines.append(f"\nNote: {n}")
    table = "\n".join(lines)
    jobs.publish(table, args.out)


if __name__ == "__main__":
    main()
