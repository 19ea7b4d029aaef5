#!/usr/bin/env python3
"""The file driver's I/O engines side by side: livesnapd with io_uring (its
default), livesnapd with the thread pool (LIVESNAP_DISABLE_IO_URING=1), qsd
with its default aio=threads and with aio=io_uring, and a "before" binary,
all in one run, over NBD with fio (bench/nbd_fio.py's jobs and set-ups).

  --measure iops  IOPS per daemon and ratio to qsd (best of --repeat runs)
  --measure cpu   daemon CPU (user+sys of all its threads, io_uring workers
                  included) and context switches per request over a fixed
                  number of requests: what a request costs the 2 shared
                  cores, and less sensitive to other load than IOPS

Usage: bench/file_engines.py [--measure iops|cpu] [--direct] [--formats raw,qcow2,qcow2-backing]
         [--jobs '4k randread QD1,...'] [--daemons qsd,qsd-uring,ls-uring,ls-threads,before]
         [--before /path/to/old/livesnapd] [--runtime S] [--repeat N] [--size BYTES]
Needs: fio (nbd engine), qemu-storage-daemon, qemu-img, a release build of livesnapd.
"""
import argparse, os, platform, shutil, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd_fio as nf  # noqa: E402

ROOT = nf.ROOT
TICK = os.sysconf("SC_CLK_TCK")


def cpu_and_switches(pid):
    """CPU seconds and context switches of every thread of `pid` so far."""
    cpu, switches = 0, 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            cpu += int(stat[11]) + int(stat[12])
            for line in open(f"/proc/{pid}/task/{tid}/status"):
                if "ctxt_switches" in line:
                    switches += int(line.split()[1])
        except FileNotFoundError:
            pass
    return cpu / TICK, switches


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", choices=["iops", "cpu"], default="iops")
    ap.add_argument("--direct", action="store_true", help="cache.direct=on / --cache-direct")
    ap.add_argument("--formats", default="raw,qcow2,qcow2-backing")
    ap.add_argument("--jobs", default=None, help="comma-separated job names (default: all)")
    ap.add_argument("--daemons", default="qsd,qsd-uring,ls-uring,ls-threads",
                    help="add 'before' (with --before) for an earlier build")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/livesnapd"))
    ap.add_argument("--before", default=None, help="an earlier livesnapd binary, the 'before' daemon")
    ap.add_argument("--runtime", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--size", type=int, default=512 << 20)
    ap.add_argument("--requests", type=int, default=20000, help="per run, with --measure cpu")
    args = ap.parse_args()
    daemons = args.daemons.split(",")
    if "before" in daemons and not args.before:
        sys.exit("the before daemon needs --before PATH")
    jobs = [j for j in nf.JOBS if args.jobs is None or j[0] in args.jobs.split(",")]
    if args.measure == "cpu":
        jobs = [j for j in jobs if j[2] == "4k"]

    work = tempfile.mkdtemp(prefix="livesnap-engines-")
    raw = os.path.join(work, "disk.img")
    subprocess.run(["dd", "if=/dev/urandom", f"of={raw}", "bs=1M", f"count={args.size >> 20}",
                    "status=none"], check=True)
    qcow2 = os.path.join(work, "disk.qcow2")

    def start(d, image, fmt, sock):
        if d.startswith("qsd"):
            opts = (",aio=io_uring" if d == "qsd-uring" else "") + \
                (",cache.direct=on" if args.direct else "")
            p = subprocess.Popen([
                "qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=disk-file,filename={image}{opts}",
                "--blockdev", f"driver={fmt},node-name=disk,file=disk-file",
                "--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=0",
                "--export", "type=nbd,id=export0,node-name=disk,name=disk,writable=on"])
        else:
            env = dict(os.environ)
            if d == "ls-threads":
                env["LIVESNAP_DISABLE_IO_URING"] = "1"
            binary = args.before if d == "before" else args.binary
            p = subprocess.Popen(
                [binary, "--image", image, "--format", fmt, "--nbd", f"unix:{sock}",
                 "--qmp", os.path.join(work, "qmp.sock"), "--max-connections", "0"]
                + (["--cache-direct"] if args.direct else []),
                stdout=subprocess.DEVNULL, env=env)
        nf.wait_socket(sock)
        return p

    def cpu_run(sock, rw, qd):
        subprocess.run([
            "fio", "--name=job", "--ioengine=nbd", f"--uri=nbd+unix:///disk?socket={sock}",
            f"--rw={rw}", "--bs=4k", f"--iodepth={qd}", f"--size={args.size}",
            f"--number_ios={args.requests}", "--randrepeat=0", "--output-format=json",
        ], check=True, capture_output=True)

    results, peak, loads = {}, {}, []
    try:
        for name, rw, bs, qd, nj in jobs:
            for rep in range(args.repeat):
                for setup in args.formats.split(","):
                    for d in (daemons if rep % 2 == 0 else daemons[::-1]):
                        image, fmt = nf.prepare_image(setup, raw, qcow2, args.size)
                        sock = os.path.join(work, f"{d}.sock")
                        p = start(d, image, fmt, sock)
                        try:
                            if args.measure == "iops":
                                r = nf.fio(sock, rw, bs, qd, nj, args.runtime, args.size)[0]
                            else:
                                c0, s0 = cpu_and_switches(p.pid)
                                cpu_run(sock, rw, qd)
                                c1, s1 = cpu_and_switches(p.pid)
                                r = ((c1 - c0) / args.requests * 1e6, (s1 - s0) / args.requests)
                            peak[d] = max(peak.get(d, 0), nf.rss_kib(p.pid))
                        finally:
                            nf.stop(p)
                            if os.path.exists(sock):
                                os.unlink(sock)
                        results.setdefault((setup, name, d), []).append(r)
                        loads.append(os.getloadavg()[0])
                        print(f"{setup:14} {name:18} {d:10} {r} load {loads[-1]:.1f}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"Machine: {os.cpu_count()} cores, {platform.platform()}; image {args.size >> 20} MiB, "
          f"{'O_DIRECT' if args.direct else 'page cache'}; 1-min load average during the run: "
          f"min {min(loads):.1f}, median {sorted(loads)[len(loads) // 2]:.1f}, max {max(loads):.1f}")
    print()
    if args.measure == "iops":
        print(f"IOPS, best of {args.repeat} runs of {args.runtime} s; ratios to qsd (aio=threads).")
        print()
        print("| image | job | " + " | ".join(daemons) + " | "
              + " | ".join(f"{d}/qsd" for d in daemons if d != "qsd") + " |")
        print("|---|---|" + "---:|" * (2 * len(daemons) - 1))
        for setup in args.formats.split(","):
            for name, *_ in jobs:
                best = {d: max(results[(setup, name, d)]) for d in daemons}
                q = best.get("qsd")
                print(f"| {setup} | {name} | " + " | ".join(f"{best[d]:.0f}" for d in daemons)
                      + " | " + " | ".join(f"{best[d] / q:.2f}" for d in daemons if d != "qsd")
                      + " |")
    else:
        print(f"Daemon CPU µs and context switches per request, {args.requests} requests per run, "
              f"least of {args.repeat} runs.")
        print()
        print("| image | job | " + " | ".join(daemons) + " |")
        print("|---|---|" + "---:|" * len(daemons))
        for setup in args.formats.split(","):
            for name, *_ in jobs:
                cells = []
                for d in daemons:
                    rs = results[(setup, name, d)]
                    cells.append(f"{min(r[0] for r in rs):.1f} µs, {min(r[1] for r in rs):.1f} cs")
                print(f"| {setup} | {name} | " + " | ".join(cells) + " |")
    print()
    print("Peak RSS (VmHWM): " + ", ".join(f"{d} {peak[d] / 1024:.0f} MiB" for d in daemons))


if __name__ == "__main__":
    main()
