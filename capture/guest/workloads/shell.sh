# Process creation: fork/exec of busybox applets, pipes, on both vCPUs.
prepare() { :; }
loop() {
    i=0
    n=$(scaled 40)
    while [ $i -lt "$n" ]; do
        echo "line $i of $1" | sed 's/line/LINE/' | tr 'a-z' 'A-Z' | wc -c > /dev/null
        ls /bin | grep -c a > /dev/null
        i=$((i + 1))
    done
}
run() { loop a & loop b & wait; }
