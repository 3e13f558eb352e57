# An idle-ish guest: short sleeps on both vCPUs, so timer interrupts and the idle loop dominate.
prepare() { :; }
ticks() {
    i=0
    n=$(scaled 20)
    while [ $i -lt "$n" ]; do usleep 50000; i=$((i + 1)); done
}
run() { ticks & ticks & wait; }
