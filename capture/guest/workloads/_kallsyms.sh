# Not a workload to record: prints the kernel's function symbols (this boot, nokaslr) so the
# host can keep them (Debian's linux-image package ships only a stub System.map).
prepare() {
    awk '$2 == "T" || $2 == "t" || $3 == "_etext" { print "A2M sym " $1 " " $2 " " $3 }' /proc/kallsyms
}
run() { :; }
