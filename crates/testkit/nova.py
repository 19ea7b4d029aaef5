#!/usr/bin/python3
"""OpenStack Nova's live snapshot of a libvirt disk, as nova/virt/libvirt
(driver.py _live_snapshot, guest.py BlockDevice) does it: a block copy with
COPY | REUSE_EXT | SHALLOW into a qcow2 delta made beforehand, blockJobInfo
polled every 0.5 s until cur == end (and the copy ready), then a synchronous
blockJobAbort. Nova's loop has no bound; this one stops after LIMIT seconds
and aborts asynchronously, so the test can say what happened.

Usage: nova.py URI DOMAIN DISK DELTA LIMIT
Prints one JSON object: converged, polls, seconds, and the CLOCK_MONOTONIC
nanoseconds around the abort (the copy is the disk at one instant in it).
"""
import json
import sys
import time

import libvirt

uri, name, disk, delta, limit = sys.argv[1:6]
limit = float(limit)
conn = libvirt.open(uri)
dom = conn.lookupByName(name)
flags = (libvirt.VIR_DOMAIN_BLOCK_REBASE_COPY
         | libvirt.VIR_DOMAIN_BLOCK_REBASE_REUSE_EXT
         | libvirt.VIR_DOMAIN_BLOCK_REBASE_SHALLOW)
dom.blockRebase(disk, delta, 0, flags)
start = time.monotonic()
polls = 0


def ready():
    # Nova's is_job_complete: cur == end, and libvirt says the copy is ready.
    info = dom.blockJobInfo(disk, 0)
    if not info or info["end"] == 0 or info["cur"] != info["end"]:
        return False
    return "ready='yes'" in dom.XMLDesc(0)


while not ready():
    polls += 1
    if time.monotonic() - start > limit:
        dom.blockJobAbort(disk, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC)
        print(json.dumps({"converged": False, "polls": polls,
                          "seconds": time.monotonic() - start}))
        sys.exit(0)
    time.sleep(0.5)

t0 = time.monotonic_ns()
dom.blockJobAbort(disk, 0)
t1 = time.monotonic_ns()
print(json.dumps({"converged": True, "polls": polls,
                  "seconds": time.monotonic() - start,
                  "abort_start_ns": t0, "abort_end_ns": t1}))
