/*
 * altp2m-capture: a QEMU TCG plugin that records every instruction fetch and data access of
 * every vCPU of a full-system x86-64 guest, with guest-physical addresses, in one global
 * order, as compact binary records (format: capture/FORMAT.md). altp2m-replay's
 * `trace import qemu-capture` turns the stream into a trace.
 *
 * Written for QEMU 7.2 (plugin API version 1). No Debian package ships QEMU's plugin
 * header, so the few API functions used here are declared below from their documented
 * signatures. The build (altp2m_replay/capture.py) passes CAP_QEMU_MAJOR/MINOR from
 * `qemu-system-x86_64 --version` and this file refuses any other version.
 *
 * Needs: -accel tcg,thread=single (all vCPUs on one host thread, so callbacks are
 * serialised and the record order is the global order), guest RAM in a memfd backend
 * (-object memory-backend-memfd,id=ram0,... -machine memory-backend=ram0) below 4 GiB: the
 * largest memfd mapping in /proc/self/maps is taken as guest RAM, so a fetch's guest-physical
 * address is its host address (qemu_plugin_insn_haddr) minus that mapping's base.
 *
 * Arguments: out=PATH (a file or FIFO), rows=N (stop at the first instruction boundary
 * once N access records are written; 0 = no limit), ram=NAME (the memfd backend id, default ram0).
 *
 * What it cannot record on 7.2: register values (no register API before 9.0), so no CR3
 * writes and no TSC; hardware page-walk accesses; accesses during interrupt delivery; DMA;
 * port I/O.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if !defined(CAP_QEMU_MAJOR) || !defined(CAP_QEMU_MINOR)
#error "build with -DCAP_QEMU_MAJOR=.. -DCAP_QEMU_MINOR=.. (altp2m-replay does this)"
#elif !(CAP_QEMU_MAJOR == 7 && CAP_QEMU_MINOR == 2)
#error "unsupported QEMU version: altp2m-capture supports QEMU 7.2 (plugin API v1, Debian 12) only"
#endif

/* ---- the part of QEMU's plugin API (version 1) this plugin uses ------------------------ */
typedef uint64_t qemu_plugin_id_t;
typedef uint32_t qemu_plugin_meminfo_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
struct qemu_plugin_hwaddr;

typedef struct {
    const char *target_name;
    struct {
        int min;
        int cur;
    } version;
    bool system_emulation;
    union {
        struct {
            int smp_vcpus;
            int max_vcpus;
        } system;
    };
} qemu_info_t;

enum cap_cb_flags { CAP_CB_NO_REGS = 0 };
enum cap_mem_rw { CAP_MEM_R = 1, CAP_MEM_W = 2, CAP_MEM_RW = 3 };

typedef void (*cap_simple_cb)(qemu_plugin_id_t id);
typedef void (*cap_udata_cb)(qemu_plugin_id_t id, void *udata);
typedef void (*cap_tb_trans_cb)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*cap_vcpu_udata_cb)(unsigned int vcpu, void *udata);
typedef void (*cap_mem_cb)(unsigned int vcpu, qemu_plugin_meminfo_t info, uint64_t vaddr,
                           void *udata);

void qemu_plugin_reset(qemu_plugin_id_t id, cap_simple_cb cb);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, cap_tb_trans_cb cb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, cap_udata_cb cb, void *udata);
void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn *insn, cap_vcpu_udata_cb cb,
                                            enum cap_cb_flags flags, void *udata);
void qemu_plugin_register_vcpu_mem_cb(struct qemu_plugin_insn *insn, cap_mem_cb cb,
                                      enum cap_cb_flags flags, enum cap_mem_rw rw, void *udata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *insn);
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *insn);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);
void *qemu_plugin_insn_haddr(const struct qemu_plugin_insn *insn);
unsigned int qemu_plugin_mem_size_shift(qemu_plugin_meminfo_t info);
bool qemu_plugin_mem_is_store(qemu_plugin_meminfo_t info);
struct qemu_plugin_hwaddr *qemu_plugin_get_hwaddr(qemu_plugin_meminfo_t info, uint64_t vaddr);
uint64_t qemu_plugin_hwaddr_phys_addr(const struct qemu_plugin_hwaddr *haddr);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

/* ---- record format (capture/FORMAT.md) ------------------------------------------------ */
#define REC_FETCH 1ULL      /* word: gpa of the first byte; next word: instruction vaddr */
#define REC_FETCH_TAIL 2ULL /* gpa of the first byte on the instruction's second page */
#define REC_READ 3ULL
#define REC_WRITE 4ULL
#define REC_INSN 5ULL /* an instruction whose fetch address is unknown (not RAM); next word:
                         its vaddr. Starts an instruction without a row */
#define REC_END 14ULL /* then 5 words: records, unresolved fetches, unresolved data,
                         unresolved fetch tails, reason */
#define GPA_MASK ((1ULL << 48) - 1)
#define VCPU_MAX 4096
#define WORD(type, vcpu, gpa) (((type) << 60) | ((uint64_t)(vcpu) << 48) | ((gpa) & GPA_MASK))
static const char MAGIC[8] = {'A', '2', 'M', 'C', 'A', 'P', 'T', '1'};
#define FORMAT_VERSION 1

/* The markers: 8-byte NOPs (nopl disp32(%rax,%rax,1)) with these displacements. */
static const uint8_t NOP8[4] = {0x0f, 0x1f, 0x84, 0x00};
#define MARK_START 0x41324d53u
#define MARK_STOP 0x41324d45u

enum reason { END_STOP_MARKER = 1, END_ROW_LIMIT = 2, END_QEMU_EXIT = 3 };

/* per translated instruction, built once at translation */
struct insn_info {
    uint64_t fetch;   /* REC_FETCH word without the vCPU */
    uint64_t vaddr;   /* instruction pointer */
    uint64_t tail;    /* REC_FETCH_TAIL word without the vCPU, or 0 */
    bool tail_unknown; /* crosses a page whose frame is unknown */
};

static qemu_plugin_id_t plugin_id;
static int out_fd = -1;
static uint64_t buf[1 << 16];
static size_t buf_len;
static uint64_t records, row_limit;
static uint64_t unresolved_fetch, unresolved_data, unresolved_tail;
static bool recording, window_done, instrumented_all, reset_pending;
static uintptr_t ram_host_base, ram_host_end;
static uint64_t ram_file_offset;
static bool ram_found;

/* a bump allocator for insn_info: translations are never freed (TBs are rarely dropped) */
static struct insn_info *arena;
static size_t arena_left;

static struct insn_info *new_info(void)
{
    if (arena_left == 0) {
        arena_left = 1 << 16;
        arena = calloc(arena_left, sizeof(*arena));
        if (!arena) {
            fprintf(stderr, "altp2m-capture: out of memory\n");
            abort();
        }
    }
    arena_left--;
    return arena++;
}

static void flush_buf(void)
{
    const char *p = (const char *)buf;
    size_t left = buf_len * sizeof(uint64_t);
    while (left) {
        ssize_t n = write(out_fd, p, left);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            fprintf(stderr, "altp2m-capture: write failed: %s\n", strerror(errno));
            _exit(3);
        }
        p += n;
        left -= (size_t)n;
    }
    buf_len = 0;
}

static inline void put(uint64_t w)
{
    buf[buf_len++] = w;
    if (buf_len == sizeof(buf) / sizeof(buf[0])) {
        flush_buf();
    }
}

static void finish(enum reason why)
{
    if (window_done || out_fd < 0) {
        return;
    }
    recording = false;
    window_done = true;
    put(WORD(REC_END, 0, 0));
    put(records);
    put(unresolved_fetch);
    put(unresolved_data);
    put(unresolved_tail);
    put((uint64_t)why);
    flush_buf();
    close(out_fd);
    out_fd = -1;
    fprintf(stderr, "altp2m-capture: window closed (%s): %llu records, %llu unresolved fetches, "
                    "%llu unresolved data, %llu unresolved fetch tails\n",
            why == END_STOP_MARKER ? "stop marker" : why == END_ROW_LIMIT ? "row limit" : "QEMU exit",
            (unsigned long long)records, (unsigned long long)unresolved_fetch,
            (unsigned long long)unresolved_data, (unsigned long long)unresolved_tail);
}

/* ---- guest RAM: host mapping of the memfd backend -------------------------------------- */
static void find_ram(void)
{
    char line[512];
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f) {
        return;
    }
    while (fgets(line, sizeof(line), f)) {
        unsigned long lo, hi, off;
        char perms[8];
        if (!strstr(line, "/memfd:") ||
            sscanf(line, "%lx-%lx %7s %lx", &lo, &hi, perms, &off) != 4) {
            continue;
        }
        if (!ram_found || hi - lo > ram_host_end - ram_host_base) { /* the largest mapping */
            ram_host_base = lo;
            ram_host_end = hi;
            ram_file_offset = off;
            ram_found = true;
        }
    }
    fclose(f);
}

static bool host_to_gpa(const void *host, uint64_t *gpa)
{
    uintptr_t h = (uintptr_t)host;
    if (!ram_found || h < ram_host_base || h >= ram_host_end) {
        return false;
    }
    *gpa = h - ram_host_base + ram_file_offset;
    return true;
}

/* ---- callbacks ------------------------------------------------------------------------ */
static void apply_state(qemu_plugin_id_t id);

static void request_reset(void)
{
    if (!reset_pending) {
        reset_pending = true;
        qemu_plugin_reset(plugin_id, apply_state);
    }
}

static void on_fetch(unsigned int vcpu, void *udata)
{
    const struct insn_info *ii = udata;
    if (!recording) {
        return;
    }
    if (row_limit && records >= row_limit) { /* stop at an instruction boundary */
        finish(END_ROW_LIMIT);
        return;
    }
    put(ii->fetch | ((uint64_t)vcpu << 48));
    put(ii->vaddr);
    if ((ii->fetch >> 60) == REC_INSN) {
        unresolved_fetch++;
        return;
    }
    if (ii->tail) {
        put(ii->tail | ((uint64_t)vcpu << 48));
        records++;
    } else if (ii->tail_unknown) {
        unresolved_tail++;
    }
    records++;
}

static void on_mem(unsigned int vcpu, qemu_plugin_meminfo_t info, uint64_t vaddr, void *udata)
{
    (void)udata;
    if (!recording) {
        return;
    }
    struct qemu_plugin_hwaddr *hw = qemu_plugin_get_hwaddr(info, vaddr);
    if (!hw) {
        unresolved_data++;
        return;
    }
    uint64_t type = qemu_plugin_mem_is_store(info) ? REC_WRITE : REC_READ;
    uint64_t gpa = qemu_plugin_hwaddr_phys_addr(hw);
    put(WORD(type, vcpu, gpa));
    records++;
    uint64_t last = vaddr + (1ULL << qemu_plugin_mem_size_shift(info)) - 1;
    if ((last >> 12) != (vaddr >> 12)) {
        /* the second page is in QEMU's TLB right after the access, when it is RAM */
        struct qemu_plugin_hwaddr *hw2 = qemu_plugin_get_hwaddr(info, last & ~0xfffULL);
        if (hw2) {
            put(WORD(type, vcpu, qemu_plugin_hwaddr_phys_addr(hw2)));
            records++;
        } else {
            unresolved_data++;
        }
    }
}

static void on_marker(unsigned int vcpu, void *udata)
{
    (void)vcpu;
    uint32_t mark = (uint32_t)(uintptr_t)udata;
    if (mark == MARK_START && !recording && !window_done) {
        recording = true;
        fprintf(stderr, "altp2m-capture: window opened\n");
        request_reset(); /* retranslate everything with full instrumentation */
    } else if (mark == MARK_STOP && recording) {
        /* No reset here: QEMU 7.2 can keep a pointer to a flushed block's memory callbacks
         * after an exception, and a flush after the window then aborts QEMU. The blocks stay
         * instrumented and the callbacks return at once. */
        finish(END_STOP_MARKER);
    }
}

static uint32_t marker_of(const struct qemu_plugin_insn *insn)
{
    if (qemu_plugin_insn_size(insn) != 8) {
        return 0;
    }
    const uint8_t *b = qemu_plugin_insn_data(insn);
    if (memcmp(b, NOP8, sizeof(NOP8)) != 0) {
        return 0;
    }
    uint32_t disp = (uint32_t)b[4] | (uint32_t)b[5] << 8 | (uint32_t)b[6] << 16 |
                    (uint32_t)b[7] << 24;
    return disp == MARK_START || disp == MARK_STOP ? disp : 0;
}

static void on_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    if (!ram_found) {
        find_ram();
    }
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint32_t mark = marker_of(insn);
        if (mark) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_marker, CAP_CB_NO_REGS,
                                                   (void *)(uintptr_t)mark);
        }
        if (!instrumented_all) {
            continue;
        }
        uint64_t vaddr = qemu_plugin_insn_vaddr(insn);
        uint64_t size = qemu_plugin_insn_size(insn);
        uint64_t gpa;
        struct insn_info *ii = new_info();
        ii->vaddr = vaddr;
        if (!host_to_gpa(qemu_plugin_insn_haddr(insn), &gpa)) {
            ii->fetch = WORD(REC_INSN, 0, 0); /* not in RAM (ROM, MMIO) */
        } else {
            ii->fetch = WORD(REC_FETCH, 0, gpa);
            uint64_t last = vaddr + size - 1;
            if ((last >> 12) != (vaddr >> 12)) {
                /* the second page's frame: from a later instruction of this block on it */
                for (size_t j = i + 1; j < n && !ii->tail; j++) {
                    struct qemu_plugin_insn *nx = qemu_plugin_tb_get_insn(tb, j);
                    uint64_t g2;
                    if ((qemu_plugin_insn_vaddr(nx) >> 12) == (last >> 12) &&
                        host_to_gpa(qemu_plugin_insn_haddr(nx), &g2)) {
                        ii->tail = WORD(REC_FETCH_TAIL, 0, g2 & ~0xfffULL);
                    }
                }
                ii->tail_unknown = !ii->tail;
            }
        }
        qemu_plugin_register_vcpu_insn_exec_cb(insn, on_fetch, CAP_CB_NO_REGS, ii);
        qemu_plugin_register_vcpu_mem_cb(insn, on_mem, CAP_CB_NO_REGS, CAP_MEM_RW, NULL);
    }
}

static void on_exit_cb(qemu_plugin_id_t id, void *udata)
{
    (void)id;
    (void)udata;
    if (recording) {
        finish(END_QEMU_EXIT);
    } else if (!window_done && out_fd >= 0) {
        fprintf(stderr, "altp2m-capture: the start marker never ran: nothing recorded\n");
        close(out_fd); /* no END record: the importer reports an empty capture */
    }
}

/* after a reset every callback is gone: register them again for the wanted state */
static void apply_state(qemu_plugin_id_t id)
{
    reset_pending = false;
    instrumented_all = recording || window_done;
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb_trans);
    qemu_plugin_register_atexit_cb(id, on_exit_cb, NULL);
    if (instrumented_all != (recording || window_done)) {
        request_reset();
    }
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id,
                                                               const qemu_info_t *info,
                                                               int argc, char **argv)
{
    const char *out = NULL;
    plugin_id = id;
    if (!info->system_emulation) {
        fprintf(stderr, "altp2m-capture: needs full-system emulation (qemu-system-*)\n");
        return -1;
    }
    if (info->system.max_vcpus > VCPU_MAX) {
        fprintf(stderr, "altp2m-capture: at most %d vCPUs\n", VCPU_MAX);
        return -1;
    }
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            out = argv[i] + 4;
        } else if (strncmp(argv[i], "rows=", 5) == 0) {
            row_limit = strtoull(argv[i] + 5, NULL, 10);
        } else {
            fprintf(stderr, "altp2m-capture: unknown argument \"%s\" (expected out=, rows=)\n",
                    argv[i]);
            return -1;
        }
    }
    if (!out) {
        fprintf(stderr, "altp2m-capture: missing out=PATH\n");
        return -1;
    }
    out_fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (out_fd < 0) {
        fprintf(stderr, "altp2m-capture: cannot open %s: %s\n", out, strerror(errno));
        return -1;
    }
    uint64_t magic;
    memcpy(&magic, MAGIC, sizeof(magic));
    put(magic);
    put(FORMAT_VERSION);
    put((uint64_t)info->system.smp_vcpus);
    put(row_limit);
    apply_state(id);
    return 0;
}
