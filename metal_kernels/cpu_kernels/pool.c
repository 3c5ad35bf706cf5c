/* The BLAS behind the library, and a small pool of threads the kernels split their work over:
 * as many as the BLAS has (the count candlewick governs), spinning briefly between jobs and
 * then sleeping on a futex. */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common.h"

enum { PAUSES = 64, SPINS = 2000 }; /* a worker's wait: 64 pauses, then yields, then sleep */

typedef int (*threads_fn)(void);

sgemm_fn real_sgemm;
sgemv_fn real_sgemv;
unsigned long long by_pool;
int kernels_off;
static threads_fn blas_threads;
static pthread_once_t bound = PTHREAD_ONCE_INIT;

static void bind(void) {
  const char *path = getenv("CANDLEWICK_KERNELS_BLAS");
  void *lib = path ? dlopen(path, RTLD_NOW | RTLD_NOLOAD) : NULL;
  void *scope = lib ? lib : RTLD_NEXT;
  real_sgemm = (sgemm_fn)dlsym(scope, "cblas_sgemm");
  real_sgemv = (sgemv_fn)dlsym(scope, "cblas_sgemv");
  blas_threads = (threads_fn)dlsym(scope, "openblas_get_num_threads");
  if (!blas_threads) blas_threads = (threads_fn)dlsym(scope, "MKL_Get_Max_Threads");
}

void need_sgemm(void) {
  if (real_sgemm) return;
  const char *path = getenv("CANDLEWICK_KERNELS_BLAS");
  fprintf(stderr, "candlewick: the CPU kernels found no cblas_sgemm (CANDLEWICK_KERNELS_BLAS=%s)\n",
          path ? path : "");
  abort();
}

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ volatile("yield");
#endif
}

/* A wait's first rounds pause the core; later ones yield it: with more runnable threads than
 * cores (the BLAS's own spinning workers, the server's Python thread), a thread spinning
 * without yielding can hold the core the one it waits for needs. */
static inline void wait_a_little(int round) {
  if (round < PAUSES)
    relax();
  else
    sched_yield();
}

void bind_blas(void) { pthread_once(&bound, bind); }

/* ---- the pool: worker i (1..parts-1) runs part i of the current job ------------------------ */

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER; /* one job on the pool */
static int workers;                                            /* started so far */
static unsigned tickets[MAX_THREADS]; /* bumped for each job a worker has a part in */
static unsigned generation;           /* futex word, bumped with every job: wakes sleepers */
static int sleepers, pending, job_parts;
static part_fn job_fn;
static const void *job_arg;

static void *worker(void *arg) {
  const int me = (int)(long)arg;
  unsigned seen = 0;
  for (;;) {
    int spin = 0;
    while (__atomic_load_n(&tickets[me], __ATOMIC_SEQ_CST) == seen) {
      if (spin++ < SPINS) {
        wait_a_little(spin);
        continue;
      }
      const unsigned now = __atomic_load_n(&generation, __ATOMIC_SEQ_CST);
      if (__atomic_load_n(&tickets[me], __ATOMIC_SEQ_CST) != seen) break;
      __atomic_add_fetch(&sleepers, 1, __ATOMIC_SEQ_CST);
      syscall(SYS_futex, &generation, FUTEX_WAIT_PRIVATE, now, NULL, NULL, 0);
      __atomic_sub_fetch(&sleepers, 1, __ATOMIC_SEQ_CST);
      spin = 0;
    }
    seen = __atomic_load_n(&tickets[me], __ATOMIC_SEQ_CST);
    job_fn(job_arg, me, job_parts); /* stable: the caller waits for this part before the next */
    __atomic_sub_fetch(&pending, 1, __ATOMIC_SEQ_CST);
  }
  return NULL;
}

static void after_fork_in_child(void) { /* the pool's threads do not exist in a child */
  pthread_mutex_init(&pool_lock, NULL);
  workers = sleepers = pending = 0;
  memset(tickets, 0, sizeof(tickets));
}

/* fn(arg, i, parts) for i in 0..parts-1, on this thread and parts-1 workers (fewer where the
 * pool is busy with another caller's job or threads cannot start). */
void run(part_fn fn, const void *arg, long parts) {
  if (parts > MAX_THREADS) parts = MAX_THREADS;
  if (parts < 2 || pthread_mutex_trylock(&pool_lock) != 0) { /* the pool is busy: alone */
    fn(arg, 0, 1);
    return;
  }
  while (workers < parts - 1) {
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    const int started = pthread_create(&t, &attr, worker, (void *)(long)(workers + 1)) == 0;
    pthread_attr_destroy(&attr);
    if (!started) break;
    workers++;
  }
  if (parts > workers + 1) parts = workers + 1;
  job_fn = fn;
  job_arg = arg;
  job_parts = (int)parts;
  __atomic_store_n(&pending, parts - 1, __ATOMIC_SEQ_CST);
  for (int i = 1; i < parts; i++) __atomic_add_fetch(&tickets[i], 1, __ATOMIC_SEQ_CST);
  __atomic_add_fetch(&generation, 1, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(&sleepers, __ATOMIC_SEQ_CST) > 0)
    syscall(SYS_futex, &generation, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
  fn(arg, 0, (int)parts);
  for (int spin = 0; __atomic_load_n(&pending, __ATOMIC_SEQ_CST) > 0; spin++) wait_a_little(spin);
  pthread_mutex_unlock(&pool_lock);
  if (parts > 1) __atomic_fetch_add(&by_pool, 1, __ATOMIC_RELAXED);
}

int threads(void) {
  bind_blas();
  return blas_threads ? blas_threads() : 1;
}

/* After a failed start-up check (metal_kernels/cpu_kernels/__init__.py, `self_check`): from now
 * on cblas_sgemm is the BLAS's own, and the engine stops calling the other kernels. */
EXPORT void candlewick_disable(void) { __atomic_store_n(&kernels_off, 1, __ATOMIC_SEQ_CST); }

EXPORT unsigned long long candlewick_pool_calls(void) {
  return __atomic_load_n(&by_pool, __ATOMIC_RELAXED);
}

__attribute__((constructor)) static void at_load(void) {
  pthread_atfork(NULL, NULL, after_fork_in_child);
}
