"""Seeded synthetic traces (``trace generate``): vectorised numpy, generated and written in
fixed-size chunks so memory stays bounded for any length.

Every workload is a stream of instructions: one fetch row (access 4) followed by 0-2 data
rows with the same ``insn``. vCPUs take turns in short runs of instructions; each vCPU has
its own instruction counter and its own clock (``tsc``, non-decreasing per vCPU). Columns:
gfn, access, vcpu, insn, ip (of the instruction, on every row), tsc; ``sandbox`` adds op and
arg: some fetch + data instructions become a fetch + a CR3 write or VMFUNC row (op 2 / 1),
and host drop / map rows (op 3 / 4, vcpu, insn, ip and tsc 0) sit between instructions.

Guest layout (4 GiB of RAM, gfns 0..0xFFFFF; the 1 GiB boundary is gfn 0x40000):
kernel text 0x1000-0x1BFF, page tables in two ranges, per-vCPU kernel stacks, a 256 MiB
data working set half of which straddles the 1 GiB boundary, scan buffers and a JIT pool.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from altp2m_replay.errors import TraceError, did_you_mean
from altp2m_replay.prefetch import prefetch
from altp2m_replay.schema import VCPU_LIMIT
from altp2m_replay.traces import DEFAULT_ROW_GROUP, TraceWriter

WORKLOADS: dict[str, str] = {
    "kernel": "kernel-like mix: Zipf-hot code pages executed, Zipf data reads/writes over "
    "64Ki pages, per-vCPU stacks, occasional page-table writes",
    "scan": "memcpy-like sequential walk: read one 128 MiB buffer, write another, from a "
    "tight loop that straddles two code pages",
    "random": "uniform random gfns over all 4 GiB: fetch from any page, 0-2 data accesses "
    "of random kind (r, w, rw)",
    "jit": "kernel mix plus a JIT: code written into a 4 MiB pool and executed soon after "
    "(write then execute; pages rewritten when the pool wraps)",
    "sandbox": "kernel mix of a DRAKVUF-style sandbox guest with control rows: processes "
    "switched by CR3 writes on every vCPU, calls to named kernel functions and "
    "system-call entry points (symbols metadata), an in-guest agent switching "
    "views with VMFUNC, and a balloon phase (host drops, later host maps)",
}

CHUNK_ROWS = 1 << 20  # generation unit; independent of the file's row-group size
RAM_PAGES = 1 << 20  # 4 GiB
TSC0 = 1_000_000_000  # guest has been up for a while
RUN_MEAN = 24  # mean instructions a vCPU runs before another vCPU's turn

# gfn layout: (first, last) inclusive
KERNEL_CODE = (0x1000, 0x1BFF)  # 12 MiB of kernel text, six 2 MiB regions
PAGE_TABLES = ((0x2000, 0x20FF), (0x7E000, 0x7E0FF))
STACKS = (0x4000, 0x4000 + 4 * VCPU_LIMIT - 1)  # 16 KiB kernel stack per vCPU
KERNEL_DATA = ((0x3C000, 0x43FFF), (0x88000, 0x8FFFF))  # first range crosses 1 GiB
SCAN_SRC = (0x3FF00, 0x3FF00 + 0x8000 - 1)  # starts just below 1 GiB
SCAN_DST = (0x90000, 0x97FFF)
JIT_POOL = (0xC0000, 0xC03FF)
BALLOON = (0x98000, 0x981FF)  # sandbox: page-cache pages the balloon driver gives back

KTEXT_VA = 0xFFFFFFFF81000000
JIT_VA = 0xFFFFFFFFC0000000
DIRECT_MAP_VA = 0xFFFF888000000000

_U64 = np.uint64


def _span(r: tuple[int, int]) -> np.ndarray:
    return np.arange(r[0], r[1] + 1, dtype=np.uint64)


class _Zipf:
    """Draws items with Zipf(s) popularity (alias method: O(1) per draw, exact).

    Popularity ranks map onto ``items`` through a seeded permutation of blocks, so hot
    items are scattered over the range but keep some neighbours.
    """

    def __init__(self, items: np.ndarray, s: float, rng: np.random.Generator, block: int):
        n = len(items)
        weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
        perm = rng.permutation(n // block)
        r = np.arange(n)
        self.by_rank = items[perm[r // block] * block + r % block]
        self.prob, self.alias = _alias_table(weights / weights.sum())

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        i = rng.integers(0, len(self.prob), size)
        i = np.where(rng.random(size) < self.prob[i], i, self.alias[i])
        return self.by_rank[i]


def _alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's alias table for probabilities ``p`` (float64, sums to 1)."""
    n = len(p)
    scaled = p * n
    prob = np.ones(n)
    alias = np.arange(n)
    small = [i for i in range(n) if scaled[i] < 1.0]
    large = [i for i in range(n) if scaled[i] >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        prob[s], alias[s] = scaled[s], g
        scaled[g] -= 1.0 - scaled[s]
        (small if scaled[g] < 1.0 else large).append(g)
    return prob, alias  # leftovers keep prob 1 (rounding)


def _pick(rng, values, probs, size) -> np.ndarray:
    """Vectorised categorical draw from a handful of ``values`` with ``probs``."""
    cdf = np.cumsum(probs[:-1]) / np.sum(probs)
    u = rng.random(size)
    idx = np.zeros(size, np.intp)
    for c in cdf:  # a few comparisons beat searchsorted for 2-4 categories
        idx += u >= c
    return np.asarray(values)[idx]


class _Skeleton:
    """One chunk of the instruction stream: per-instruction and per-row bookkeeping."""

    __slots__ = ("data_rows", "first", "index", "insn", "m", "row_insn", "sizes", "tsc", "vcpu")


class _Stream:
    """Instruction stream state carried from chunk to chunk."""

    def __init__(self, rng: np.random.Generator, vcpus: int):
        self.rng = rng
        self.k = vcpus
        self.cur = vcpus - 1  # vCPU of the last run; the first run goes to vCPU 0
        self.insn = np.zeros(vcpus, np.int64)  # instructions retired per vCPU
        self.clock = np.full(vcpus, TSC0, np.int64)  # per-vCPU tsc
        self.total = 0  # instructions so far, all vCPUs

    def skeleton(self, rows: int, data_probs) -> _Skeleton:
        """Draw instructions covering exactly ``rows`` rows; data_probs[j] = P(j data rows)."""
        rng, sk = self.rng, _Skeleton()
        mean = 1.0 + sum(j * p for j, p in enumerate(data_probs))
        parts, total = [], 0
        while total < rows:
            extra = _pick(
                rng, np.arange(len(data_probs)), data_probs, int((rows - total) / mean * 1.02) + 16
            )
            parts.append(extra + 1)
            total += int(parts[-1].sum())
        sizes = np.concatenate(parts)
        cum = np.cumsum(sizes)
        m = int(np.searchsorted(cum, rows)) + 1
        sizes = sizes[:m]
        sizes[-1] -= cum[m - 1] - rows  # the chunk's last instruction may lose data rows
        sk.m, sk.sizes = m, sizes

        k = self.k
        if k == 1:
            v = np.zeros(m, np.int64)
        else:
            lens = []
            covered = 0
            while covered < m:
                lens.append(rng.geometric(1.0 / RUN_MEAN, (m - covered) // RUN_MEAN + 16))
                covered += int(lens[-1].sum())
            lens = np.concatenate(lens)
            # Each run goes to a different vCPU than the one before it.
            run_v = (self.cur + np.cumsum(rng.integers(1, k, len(lens)))) % k
            heads = (np.cumsum(lens) - lens)[1:]
            marks = np.zeros(m, np.int64)
            marks[heads[heads < m]] = 1
            v = run_v[np.cumsum(marks)]
            self.cur = int(v[-1])
        sk.vcpu = v

        # Per-vCPU instruction ids and clocks: group by vCPU (stable keeps trace order).
        order = np.argsort(v, kind="stable")
        counts = np.bincount(v, minlength=k)
        group_start = np.cumsum(counts) - counts
        rank = np.empty(m, np.int64)
        rank[order] = np.arange(m) - np.repeat(group_start, counts)
        sk.insn = self.insn[v] + rank
        self.insn += counts
        cost = rng.geometric(0.4, m).astype(np.int64)  # cycles per instruction, mean 2.5
        sorted_cost = cost[order]
        inclusive = np.cumsum(sorted_cost)
        group_sum = np.bincount(v, weights=cost, minlength=k).astype(np.int64)
        before = np.cumsum(group_sum) - group_sum
        tsc = np.empty(m, np.int64)
        tsc[order] = inclusive - sorted_cost - np.repeat(before, counts)
        sk.tsc = self.clock[v] + tsc
        self.clock += group_sum

        sk.first = np.cumsum(sizes) - sizes  # row of each instruction's fetch
        is_data = np.ones(rows, bool)
        is_data[sk.first] = False
        sk.data_rows = np.flatnonzero(is_data)
        # Instruction of every row: a cumulative count of fetch rows (cheaper than np.repeat).
        sk.row_insn = np.cumsum(~is_data) - 1
        sk.index = self.total + np.arange(m)  # global instruction number
        self.total += m
        return sk


def _runs(sk: _Skeleton, rng, p_jump: float) -> tuple[np.ndarray, np.ndarray]:
    """Control-flow locality: mostly stay on the previous instruction's code page, jump with
    probability ``p_jump`` and at every vCPU switch. Returns (jump mask, index of the
    instruction whose jump target applies) per instruction."""
    m = sk.m
    jump = rng.random(m) < p_jump
    jump[0] = True
    jump[1:] |= sk.vcpu[1:] != sk.vcpu[:-1]
    src = np.maximum.accumulate(np.where(jump, np.arange(m), 0))
    return jump, src


def _gfn_sets(workload: str, vcpus: int) -> dict[str, list[list[int]]]:
    """Named gfn ranges of the generated guest (trace metadata ``gfn_sets``)."""
    sets = {"page_tables": [list(r) for r in PAGE_TABLES], "kernel_code": [list(KERNEL_CODE)]}
    if workload in ("kernel", "jit", "sandbox"):
        sets["kernel_stacks"] = [[STACKS[0], STACKS[0] + 4 * vcpus - 1]]
        sets["kernel_data"] = [list(r) for r in KERNEL_DATA]
    if workload == "scan":
        sets["scan_buffers"] = [list(SCAN_SRC), list(SCAN_DST)]
    if workload == "jit":
        sets["jit"] = [list(JIT_POOL)]
    if workload == "sandbox":
        sets["balloon"] = [list(BALLOON)]
    return sets


# sandbox: kernel functions the trace calls (its ``symbols``): system-call entry points and
# what they run into, the context switch, and the in-guest agent that switches views.
SYSCALLS = (
    "read",
    "write",
    "openat",
    "close",
    "newfstat",
    "mmap",
    "munmap",
    "brk",
    "futex",
    "poll",
    "epoll_wait",
    "ioctl",
    "nanosleep",
    "clone",
    "execve",
    "exit_group",
    "sendto",
    "recvfrom",
    "getpid",
    "rt_sigaction",
)
KERNEL_FUNCS = (
    "entry_SYSCALL_64",
    "do_syscall_64",
    "ksys_read",
    "ksys_write",
    "vfs_read",
    "vfs_write",
    "do_sys_openat2",
    "do_filp_open",
    "__schedule",
    "switch_mm_irqs_off",
    "__switch_to_asm",
    "asm_exc_page_fault",
    "do_user_addr_fault",
    "handle_mm_fault",
    "kmem_cache_alloc",
    "kfree",
    "__kmalloc",
    "_raw_spin_lock",
    "mutex_lock",
    "agent_switch_view",
)
PROCESSES = ("systemd", "sshd", "bash", "python3", "nginx", "postgres")
MOV_CR3_AT = ("switch_mm_irqs_off", 0x5C)  # (function, offset) of the CR3 write
VMFUNC_AT = ("agent_switch_view", 0x10)  # ... of the agent's VMFUNC
P_CONTROL = 0.01  # share of fetch + 1 data row instructions that become CR3 writes / VMFUNCs
P_CR3 = 0.75  # of those, CR3 writes; the rest VMFUNCs


def _symbols() -> dict[str, int]:
    """Name -> ip of every sandbox function: 16-byte aligned entries spread over kernel text."""
    names = [f"__x64_sys_{c}" for c in SYSCALLS] + list(KERNEL_FUNCS)
    return {
        name: KTEXT_VA + (0x80 + 37 * j) * 4096 + (j * 0x2D0) % 0xF00
        for j, name in enumerate(names)
    }


def _processes() -> dict[str, int]:
    """Name -> CR3 (the page-directory page, in the page-table range) of every sandbox process."""
    return {name: (PAGE_TABLES[0][0] + 0x10 * i) << 12 for i, name in enumerate(PROCESSES)}


class _Sandbox:
    """Sandbox state: call targets, and the balloon schedule over the whole trace of ``n``
    rows: page k of BALLOON is dropped (op 3) at a row in [0.3 n, 0.4 n) and mapped again
    (op 4) at a row in [0.65 n, 0.75 n); data rows touch balloon pages only before the first
    drop and after the last map (in rows without control rows: ``base_done``)."""

    def __init__(self, n: int):
        sym = _symbols()
        names = list(sym)
        self.va = np.array(list(sym.values()), np.uint64)
        self.gfn = np.uint64(KERNEL_CODE[0]) + (self.va - np.uint64(KTEXT_VA)) // np.uint64(4096)
        w = np.array([3.0 if n_.startswith("__x64_sys_") else 1.0 for n_ in names])
        w[names.index("entry_SYSCALL_64")] = w[names.index("do_syscall_64")] = 8.0
        self.weights = w / w.sum()
        self.sites = {
            key: (sym[f] + off, KERNEL_CODE[0] + (sym[f] + off - KTEXT_VA) // 4096)
            for key, (f, off) in (("cr3", MOV_CR3_AT), ("vmfunc", VMFUNC_AT))
        }
        self.cr3 = np.array(list(_processes().values()), np.uint64)
        pages = min(BALLOON[1] - BALLOON[0] + 1, n // 400)
        k = np.arange(pages, dtype=np.int64)
        spread = k * (n // 10) // max(pages, 1)
        self.pos = np.concatenate([n * 3 // 10 + spread, n * 13 // 20 + spread])  # final rows
        self.pos_op = np.repeat(np.array([3, 4], np.uint8), pages)
        self.pos_gfn = np.tile(np.uint64(BALLOON[0]) + k.astype(np.uint64), 2)
        self.pages = pages
        self.quiet = (n * 3 // 10, n * 13 // 20 + n // 10)  # no balloon-page accesses in here
        self.done = 0  # rows emitted
        self.base_done = 0  # rows emitted that are not op 3/4 rows


class _Generator:
    """Builds chunks (dicts of numpy arrays) for one workload."""

    def __init__(self, workload: str, seed: int, vcpus: int, n: int = 0):
        self.workload = workload
        self.rng = np.random.default_rng(seed)
        self.stream = _Stream(self.rng, vcpus)
        self.vcpus = vcpus
        rng = self.rng
        if workload in ("kernel", "jit", "sandbox"):
            self.code = _Zipf(_span(KERNEL_CODE), 1.2, rng, block=4)
            self.data = _Zipf(np.concatenate([_span(r) for r in KERNEL_DATA]), 1.0, rng, block=16)
            self.pt = np.concatenate([_span(r) for r in PAGE_TABLES])
        if workload == "sandbox":
            self.sandbox = _Sandbox(n)

    def chunk(self, rows: int) -> dict[str, np.ndarray]:
        return getattr(self, "_" + self.workload)(rows)

    @staticmethod
    def _assemble(sk, rows, code_gfn, ip, data_gfn, data_access) -> dict[str, np.ndarray]:
        gfn = np.empty(rows, np.uint64)
        access = np.empty(rows, np.uint8)
        gfn[sk.first] = code_gfn
        access[sk.first] = 4
        gfn[sk.data_rows] = data_gfn
        access[sk.data_rows] = data_access
        return {
            "gfn": gfn,
            "access": access,
            "vcpu": sk.vcpu.astype(np.uint16)[sk.row_insn],
            "insn": sk.insn.astype(np.uint64)[sk.row_insn],
            "ip": ip[sk.row_insn],
            "tsc": sk.tsc.astype(np.uint64)[sk.row_insn],
        }

    def _code(self, sk, p_jump: float, jit: bool, runs: bool = False):
        """Code gfn and ip per instruction with page locality and sequential ips (and with
        ``runs``, _runs's jump mask and run heads)."""
        rng, m = self.rng, sk.m
        jump, src = _runs(sk, rng, p_jump)
        n_jump = int(jump.sum())
        target = np.zeros(m, np.uint64)
        target[jump] = self.code.sample(rng, n_jump)
        va_base = np.zeros(m, np.uint64)
        va_base[jump] = _U64(KTEXT_VA) + (target[jump] - _U64(KERNEL_CODE[0])) * _U64(4096)
        if jit:
            # Some jumps land in JIT code emitted a little earlier (never in unwritten pages).
            emit = sk.index // JIT_PERIOD
            page = emit - rng.geometric(0.35, m)  # pages emitted 1, 2, ... periods ago
            to_jit = jump & (rng.random(m) < 0.3) & (page >= 0)
            off = (page[to_jit] % (JIT_POOL[1] - JIT_POOL[0] + 1)).astype(np.uint64)
            target[to_jit] = _U64(JIT_POOL[0]) + off
            va_base[to_jit] = _U64(JIT_VA) + off * _U64(4096)
        start_off = np.zeros(m, np.uint64)
        start_off[jump] = rng.integers(0, 256, n_jump).astype(np.uint64) * _U64(16)
        # Straight-line code: 4 bytes per instruction after the jump, wrapping in the page.
        step = (np.arange(m) - src).astype(np.uint64) * _U64(4)
        ip = va_base[src] + (start_off[src] + step) % _U64(4096)
        return (target[src], ip, jump, src) if runs else (target[src], ip)

    def _kernel(self, rows: int, jit: bool = False) -> dict[str, np.ndarray]:
        return self._assemble(*self._kernel_rows(rows, jit))

    def _kernel_rows(self, rows: int, jit: bool = False, code=None):
        """The kernel mix as _assemble's arguments; ``code`` replaces :meth:`_code`."""
        rng = self.rng
        sk = self.stream.skeleton(rows, (0.45, 0.45, 0.10))
        code_gfn, ip = (code or self._code)(sk, 0.12, jit)
        d = len(sk.data_rows)
        data_insn = sk.row_insn[sk.data_rows]
        dv = sk.vcpu[data_insn].astype(np.uint64)  # vCPU of each data row
        gfn = self.data.sample(rng, d)
        access = _pick(rng, np.array([1, 2, 3], np.uint8), (0.65, 0.25, 0.10), d)
        u = rng.random(d)
        stack = u < 0.30
        # Stack accesses: mostly the top page of the vCPU's stack; push/pop, no rmw.
        gfn[stack] = _U64(STACKS[0]) + dv[stack] * _U64(4) + (u[stack] < 0.08).astype(np.uint64)
        access[stack] = np.minimum(access[stack], 2)
        pt = (u >= 0.30) & (u < 0.31)
        gfn[pt] = self.pt[rng.integers(0, len(self.pt), int(pt.sum()))]
        access[pt] = np.where(u[pt] < 0.3085, 2, 3)
        # Loads from the instruction's own code page (RIP-relative constants, jump tables,
        # integrity checks): what execute-only hooks on hot code pages trap.
        lit = (u >= 0.39) & (u < 0.41)
        gfn[lit] = code_gfn[data_insn[lit]]
        access[lit] = 1
        if jit:
            # Stores of freshly generated code into the current emit page.
            emit = sk.index[data_insn] // JIT_PERIOD
            js = (u >= 0.31) & (u < 0.39)
            gfn[js] = _U64(JIT_POOL[0]) + (emit[js] % (JIT_POOL[1] - JIT_POOL[0] + 1)).astype(
                np.uint64
            )
            access[js] = 2
        return sk, rows, code_gfn, ip, gfn, access

    def _jit(self, rows: int) -> dict[str, np.ndarray]:
        return self._kernel(rows, jit=True)

    def _sandbox_code(self, sk, p_jump: float, jit: bool):
        """_code, with some jumps being calls: their run starts at a function entry."""
        rng, sb = self.rng, self.sandbox
        code_gfn, ip, jump, src = self._code(sk, p_jump, jit, runs=True)
        call = jump & (rng.random(sk.m) < 0.35)
        which = np.full(sk.m, -1, np.int64)
        which[call] = rng.choice(len(sb.va), int(call.sum()), p=sb.weights)
        w = which[src]
        hit = w >= 0
        va = sb.va[w[hit]]
        step = (np.arange(sk.m) - src)[hit].astype(np.uint64) * _U64(4)
        page_off = va & _U64(0xFFF)
        ip[hit] = va - page_off + (page_off + step) % _U64(4096)
        code_gfn[hit] = sb.gfn[w[hit]]
        return code_gfn, ip

    def _sandbox(self, rows: int) -> dict[str, np.ndarray]:
        rng, sb = self.rng, self.sandbox
        lo, hi = np.searchsorted(sb.pos, [sb.done, sb.done + rows])
        base = rows - int(hi - lo)  # rows that are not op 3/4 rows
        if base:
            sk, _, code_gfn, ip, gfn, access = self._kernel_rows(base, code=self._sandbox_code)
            if sb.pages:  # page-cache use of the balloon pages while the guest owns them
                a = sb.base_done + sk.data_rows
                cache = ((a < sb.quiet[0]) | (a >= sb.quiet[1])) & (rng.random(len(a)) < 0.03)
                gfn[cache] = _U64(BALLOON[0]) + rng.integers(0, sb.pages, int(cache.sum())).astype(
                    np.uint64
                )
                access[cache] = _pick(rng, np.array([1, 2], np.uint8), (0.6, 0.4), int(cache.sum()))
            chunk = self._assemble(sk, base, code_gfn, ip, gfn, access)
            chunk["op"] = np.zeros(base, np.uint8)
            chunk["arg"] = np.zeros(base, np.uint64)
            # CR3 writes and VMFUNCs: the data row of a fetch + 1 data row instruction becomes
            # the control row, and the instruction moves to its site
            pick = np.flatnonzero(sk.sizes == 2)
            pick = pick[rng.random(len(pick)) < P_CONTROL]
            cr3 = rng.random(len(pick)) < P_CR3
            args = np.where(
                cr3,
                sb.cr3[rng.integers(0, len(sb.cr3), len(pick))],
                rng.choice(3, len(pick), p=(0.5, 0.3, 0.2)).astype(np.uint64),
            )
            ctl = sk.first[pick] + 1
            chunk["op"][ctl] = np.where(cr3, 2, 1)
            chunk["arg"][ctl] = args
            chunk["access"][ctl] = 0
            chunk["gfn"][ctl] = 0
            for key, mask in (("cr3", cr3), ("vmfunc", ~cr3)):
                site_ip, site_gfn = sb.sites[key]
                chunk["ip"][ctl[mask]] = chunk["ip"][ctl[mask] - 1] = site_ip
                chunk["gfn"][ctl[mask] - 1] = site_gfn
        else:
            chunk = {
                c: np.zeros(0, dt)
                for c, dt in (
                    ("gfn", np.uint64),
                    ("access", np.uint8),
                    ("vcpu", np.uint16),
                    ("insn", np.uint64),
                    ("ip", np.uint64),
                    ("tsc", np.uint64),
                    ("op", np.uint8),
                    ("arg", np.uint64),
                )
            }
        # host drops and maps at their rows; their vcpu, insn, ip and tsc are ignored (0)
        pos = sb.pos[lo:hi] - sb.done
        at = pos - np.arange(len(pos))
        extra = {"gfn": sb.pos_gfn[lo:hi], "op": sb.pos_op[lo:hi]}
        chunk = {c: np.insert(v, at, extra.get(c, 0)) for c, v in chunk.items()}
        sb.done += rows
        sb.base_done += base
        return chunk

    def _scan(self, rows: int) -> dict[str, np.ndarray]:
        sk = self.stream.skeleton(rows, (0.25, 0.75))
        # An 8-instruction loop placed so its last two instructions sit on the next page.
        pos = (sk.insn % 8).astype(np.uint64)
        loop_gfn = KERNEL_CODE[0] + 0x40
        code_gfn = _U64(loop_gfn) + (pos >= 6).astype(np.uint64)
        ip = _U64(KTEXT_VA + 0x40 * 4096 + 0xFE8) + pos * _U64(4)
        # Even instructions read the source, odd ones write the destination, 256 bytes apart;
        # the vCPUs share the copy page by page (vCPU v takes pages v, v + K, v + 2K, ...).
        has_data = sk.sizes > 1
        i = sk.insn[has_data]
        v = sk.vcpu[has_data]
        pages = SCAN_SRC[1] - SCAN_SRC[0] + 1
        page = (((i // 2) * 256 >> 12) * self.vcpus + v) % pages
        write = (i % 2) == 1
        gfn = np.where(write, SCAN_DST[0], SCAN_SRC[0]) + page
        access = np.where(write, 2, 1).astype(np.uint8)
        return self._assemble(sk, rows, code_gfn, ip, gfn.astype(np.uint64), access)

    def _random(self, rows: int) -> dict[str, np.ndarray]:
        rng = self.rng
        sk = self.stream.skeleton(rows, (0.40, 0.45, 0.15))
        code_gfn = rng.integers(0, RAM_PAGES, sk.m).astype(np.uint64)
        ip = (
            _U64(DIRECT_MAP_VA)
            + code_gfn * _U64(4096)
            + rng.integers(0, 4096, sk.m).astype(np.uint64)
        )
        d = len(sk.data_rows)
        gfn = rng.integers(0, RAM_PAGES, d).astype(np.uint64)
        access = rng.integers(1, 4, d).astype(np.uint8)
        return self._assemble(sk, rows, code_gfn, ip, gfn, access)


JIT_PERIOD = 2048  # instructions between two JIT code emissions (one page each)


def _check(workload: str, n: int, vcpus: int, seed: int = 0) -> None:
    if not isinstance(seed, int) or seed < 0:  # numpy seeds only non-negative integers
        raise TraceError(f"--seed must be a non-negative integer, found {seed}")
    if workload not in WORKLOADS:
        raise TraceError(
            f'unknown workload "{workload}"{did_you_mean(workload, WORKLOADS)}; '
            f"expected one of {', '.join(WORKLOADS)}"
        )
    if n < 1:
        raise TraceError(f"-n must be at least 1, found {n}")
    if not 1 <= vcpus <= VCPU_LIMIT:
        raise TraceError(f"--vcpus must be in 1..{VCPU_LIMIT}, found {vcpus}")


def iter_chunks(
    workload: str, n: int, seed: int = 0, vcpus: int = 1, chunk_rows: int | None = None
):
    """Yield the trace as dicts of numpy arrays (gfn uint64, access uint8, vcpu uint16,
    insn/ip/tsc uint64; sandbox: op uint8, arg uint64) of ``chunk_rows`` rows (default CHUNK_ROWS; the last may be shorter).
    The rows depend on the chunk size, so keep the default for reproducible traces."""
    _check(workload, n, vcpus, seed)
    chunk_rows = chunk_rows or CHUNK_ROWS
    gen = _Generator(workload, seed, vcpus, n)
    done = 0
    while done < n:
        rows = min(chunk_rows, n - done)
        yield gen.chunk(rows)
        done += rows


def generate_arrays(workload: str, n: int, seed: int = 0, vcpus: int = 1) -> dict[str, np.ndarray]:
    """The whole trace in memory (for tests and benchmarks); same rows as :func:`generate`."""
    chunks = list(iter_chunks(workload, n, seed, vcpus))
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def metadata(workload: str, seed: int, vcpus: int) -> dict:
    """The trace metadata dict a generated trace carries."""
    _check(workload, 1, vcpus)
    return {
        "format": 1,
        "source": f"generate {workload} seed={seed}",
        "vcpus": vcpus,
        "ram": [[0, RAM_PAGES - 1]],
        "gfn_sets": _gfn_sets(workload, vcpus),
    } | ({"symbols": _symbols(), "processes": _processes()} if workload == "sandbox" else {})


def generate(
    workload: str,
    n: int,
    seed: int = 0,
    vcpus: int = 1,
    output=None,
    row_group_size: int = DEFAULT_ROW_GROUP,
) -> Path:
    """Write ``n`` rows of ``workload`` to ``output`` (atomically); same seed, same bytes."""
    if output is None:
        raise TypeError("generate() needs output=PATH")
    _check(workload, n, vcpus, seed)
    meta = metadata(workload, seed, vcpus)
    chunks = prefetch(iter_chunks(workload, n, seed, vcpus))
    try:
        with TraceWriter(output, meta=meta, row_group_size=row_group_size) as w:
            for chunk in chunks:
                w.write(chunk)
    finally:
        chunks.close()
    return Path(output)
