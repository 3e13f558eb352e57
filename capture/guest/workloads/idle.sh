# An idle-ish guest: short sleeps on both vCPUs, so timer interrupts and the idle loop dominate.
prepare() { :; }
ticks() {
    i=0
    while [ $i -lt 20 ]; do usleep 50000; i=$((i + 1)); done
}
run() { ticks & ticks & wait; }
