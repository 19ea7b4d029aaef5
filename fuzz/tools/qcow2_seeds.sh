#!/bin/sh
# Seeds for the qcow2 fuzz target: small images made by qemu-img and
# qemu-io (512-byte clusters keep them a few KB): empty, with data, with a
# backing file name, with persistent dirty bitmaps, compressed, refcount
# widths, v2. Usage: qcow2_seeds.sh OUTDIR
set -eu
out=$1
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mk() { qemu-img create -q -f qcow2 -o "cluster_size=512,$2" "$tmp/$1" "${3:-1M}"; }
mk empty.qcow2 compat=1.1
mk v2.qcow2 compat=0.10
mk refcount1.qcow2 refcount_bits=1
mk refcount64.qcow2 refcount_bits=64
mk lazy.qcow2 lazy_refcounts=on
mk extl2.qcow2 extended_l2=on,cluster_size=16384 256K
mk data.qcow2 compat=1.1
qemu-io -f qcow2 -c 'write -P 0x11 0 1024' -c 'write -z 4096 512' -c 'write -P 0x22 1047552 1024' "$tmp/data.qcow2" >/dev/null
mk backing.qcow2 compat=1.1
qemu-img rebase -q -u -f qcow2 -F raw -b base.raw "$tmp/backing.qcow2"
mk bitmaps.qcow2 compat=1.1
qemu-img bitmap --add "$tmp/bitmaps.qcow2" b0
qemu-img bitmap --add -g 65536 "$tmp/bitmaps.qcow2" b1
qemu-io -f qcow2 -c 'write -P 0x33 0 4096' "$tmp/bitmaps.qcow2" >/dev/null
qemu-img bitmap --disable "$tmp/bitmaps.qcow2" b1
head -c 4096 /dev/urandom > "$tmp/rand"
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=512 "$tmp/rand" "$tmp/comp.qcow2"
for f in "$tmp"/*.qcow2; do
    cp "$f" "$out/$(sha1sum "$f" | cut -c1-16)"
done
ls "$out" | wc -l
du -sh "$out"
