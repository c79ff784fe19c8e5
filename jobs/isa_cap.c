/* isa_cap: make a process see an AVX2-only CPU on an AVX-512 machine, for benchmarks (LD_PRELOAD).
 *
 * Why: ONNX Runtime's MLAS picks its kernels from CPUID and has no switch to cap them, unlike torch
 * (ATEN_CPU_CAPABILITY) and oneDNN (ONEDNN_MAX_CPU_ISA). Most users' desktops are AVX2-only, so a benchmark run on an
 * AVX-512 machine must be able to take the AVX2 paths of every runtime to say anything about them.
 *
 * How: Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, 0; CPU flag `cpuid_fault`) makes every CPUID instruction in
 * this process trap with SIGSEGV. The handler runs the real CPUID with faulting briefly off, clears the AVX-512 (and
 * AMX, AVX10) feature bits of leaf 7, writes the result into the interrupted registers and steps over the 2-byte
 * instruction. The setting is per thread and inherited by threads and forks; exec resets it, and LD_PRELOAD sets it
 * again in the new image. A SIGSEGV handler the program installs later (Python's faulthandler, say) is kept and
 * called for every other fault. If the CPU or kernel cannot fault on CPUID the process exits with status 3 and says
 * so: a run labelled AVX2 must never silently run AVX-512 kernels.
 *
 * ISA_CAP_REPORT=1 prints, at exit, how many CPUID instructions were answered and which leaves were asked.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

/* Leaf 7 sub-leaf 0. EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31. */
#define L7_EBX ((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31))
/* ECX: VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14. */
#define L7_ECX ((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14))
/* EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, AVX512-FP16 23, AMX-TILE 24, AMX-INT8 25. */
#define L7_EDX ((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25))
/* Leaf 7 sub-leaf 1. EAX: AVX512-BF16 5, AMX-FP16 21; EDX: AVX10 19. */
#define L7S1_EAX ((1u << 5) | (1u << 21))
#define L7S1_EDX (1u << 19)

static int (*real_sigaction)(int, const struct sigaction *, struct sigaction *);
static struct sigaction app_segv; /* what the program asked for; called for faults that are not CPUID */
static int installed;
static long answered;
static unsigned leaves_seen[64];
static int n_leaves;

static long set_cpuid(int enabled) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled); }

static void remember(unsigned leaf) {
    for (int i = 0; i < n_leaves; i++)
        if (leaves_seen[i] == leaf) return;
    if (n_leaves < 64) leaves_seen[n_leaves++] = leaf;
}

static void on_segv(int sig, siginfo_t *info, void *ctx) {
    ucontext_t *uc = ctx;
    greg_t *r = uc->uc_mcontext.gregs;
    /* A CPUID fault is a general protection fault (SI_KERNEL) at a mapped, executable RIP, so reading it is safe. */
    if (info->si_code == SI_KERNEL) {
        const unsigned char *ip = (const unsigned char *)r[REG_RIP];
        if (ip[0] == 0x0f && ip[1] == 0xa2) {
            unsigned leaf = (unsigned)r[REG_RAX], sub = (unsigned)r[REG_RCX], a, b, c, d;
            set_cpuid(1);
            __cpuid_count(leaf, sub, a, b, c, d);
            set_cpuid(0);
            if (leaf == 7 && sub == 0) {
                b &= ~L7_EBX;
                c &= ~L7_ECX;
                d &= ~L7_EDX;
            } else if (leaf == 7 && sub == 1) {
                a &= ~L7S1_EAX;
                d &= ~L7S1_EDX;
            }
            r[REG_RAX] = a;
            r[REG_RBX] = b;
            r[REG_RCX] = c;
            r[REG_RDX] = d;
            r[REG_RIP] += 2;
            __atomic_add_fetch(&answered, 1, __ATOMIC_RELAXED);
            remember(leaf);
            return;
        }
    }
    /* Not ours: what the program installed, else the default action (return and fault again). */
    if ((app_segv.sa_flags & SA_SIGINFO) && app_segv.sa_sigaction) {
        app_segv.sa_sigaction(sig, info, ctx);
    } else if (app_segv.sa_handler != SIG_DFL && app_segv.sa_handler != SIG_IGN) {
        app_segv.sa_handler(sig);
    } else {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &dfl, NULL);
    }
}

/* The program's own SIGSEGV handler is recorded, not installed, so ours stays in front of it. */
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction) real_sigaction = dlsym(RTLD_NEXT, "sigaction");
    if (sig == SIGSEGV && installed) {
        struct sigaction prev = app_segv;
        if (act) app_segv = *act;
        if (old) *old = prev;
        return 0;
    }
    return real_sigaction(sig, act, old);
}

static void report(void) {
    fprintf(stderr, "isa_cap: %ld CPUID answered with AVX-512 hidden; leaves:", answered);
    for (int i = 0; i < n_leaves; i++) fprintf(stderr, " 0x%x", leaves_seen[i]);
    fprintf(stderr, "\n");
}

__attribute__((constructor)) static void isa_cap_init(void) {
    if (!real_sigaction) real_sigaction = dlsym(RTLD_NEXT, "sigaction");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    memset(&app_segv, 0, sizeof app_segv);
    if (real_sigaction(SIGSEGV, &sa, &app_segv) != 0 || set_cpuid(0) != 0) {
        fprintf(stderr, "isa_cap: this CPU or kernel cannot fault on CPUID (arch_prctl ARCH_SET_CPUID: %s); "
                        "the AVX2 cap cannot be applied\n", strerror(errno));
        _exit(3);
    }
    installed = 1;
    const char *rep = getenv("ISA_CAP_REPORT");
    if (rep && *rep && strcmp(rep, "0") != 0) atexit(report);
}
