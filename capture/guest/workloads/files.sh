# File work over a few MiB in tmpfs: hashing, compression, sorting, on both vCPUs.
prepare() {
    dd if=/dev/urandom of=/tmp/blob bs=1024 count=$(scaled 4096) 2>/dev/null
    seq 1 $(scaled 200000) | awk '{ print ($1 * 7919) % 100003, $1 }' > /tmp/lines
}
run() {
    { sha256sum /tmp/blob > /tmp/blob.sha; gzip -c /tmp/blob > /tmp/blob.gz; } &
    { sort -n /tmp/lines > /tmp/sorted; gzip -c /tmp/lines | gunzip | sha256sum > /dev/null; } &
    wait
}
