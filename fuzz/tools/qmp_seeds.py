#!/usr/bin/env python3
"""Seeds for the QMP fuzz targets: the client side of every connection in
docs/qmp-qsd-transcript.md (what was sent to qemu-storage-daemon), one file
per connection and one per message. Usage: qmp_seeds.py TRANSCRIPT OUTDIR..."""
import hashlib
import os
import sys

MAX_SEED = 4096


def unescape(text):
    # The transcript writes \n, \r and \t for the raw bytes; nothing else is escaped.
    return text.replace("\\n", "\n").replace("\\r", "\r").replace("\\t", "\t").encode()


def blocks(path):
    sent, inside = [], False
    for line in open(path, encoding="utf-8"):
        line = line.rstrip("\n")
        if line.startswith("```"):
            if inside and sent:
                yield b"".join(sent)
            sent, inside = [], not inside
        elif inside and line.startswith("-> ") and "more characters]" not in line:
            sent.append(unescape(line[3:]))
            # Each message on its own too: small seeds mutate well.
            yield sent[-1]


def main():
    transcript, outs = sys.argv[1], sys.argv[2:]
    n, seen = 0, set()
    for data in blocks(transcript):
        if len(data) > MAX_SEED or data in seen:
            continue
        seen.add(data)
        name = hashlib.sha1(data).hexdigest()[:16]
        for out in outs:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, name), "wb") as f:
                f.write(data)
        n += 1
    print(f"{n} QMP seeds")


main()
