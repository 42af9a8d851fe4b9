// The persistent thread pool behind parallel() (team.h has why it exists and its contract).
//
// Synchronisation: one mutex `busy` admits one call at a time. The caller writes the call's body and
// argument, then publishes `call` = (sequence number << 16 | team size) (release). A worker that loads a
// new `call` (acquire) has the size in the same word; a member (index < size) then reads body and
// argument, runs, and decrements `running` (release); the caller returns after seeing `running` reach 0
// (acquire), so the members' writes are visible to it and no member still reads body or argument when
// the next call overwrites them (workers outside the team read only `call`).
// Sleeping workers: a worker increments `sleepers` and re-checks `call` under `sleep_mutex` before
// waiting; the caller publishes `call` and then reads `sleepers`, both sequentially consistent, so
// either the caller sees the sleeper and notifies under the mutex, or the sleeper sees the new call
// and does not wait (no lost wake-up).
// Barrier (centralised, by phase): each member reads the phase, then increments `arrived`; the last
// one resets `arrived` and publishes phase + 1 (release), which the others spin on (acquire). The
// arrivals' read-modify-writes form one release sequence, so every member's writes before the barrier
// happen before every member's reads after it.
#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "team.h"
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr auto kSpinBeforeYield = std::chrono::microseconds(50);
constexpr auto kSpinBeforeSleep = std::chrono::milliseconds(2);

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

// Spins until done() holds: pauses at first, then yields the CPU (another runnable thread, such as
// torch's, gets it); gives up at kSpinBeforeSleep and returns false (only where may_sleep).
template <class Done>
bool spin_until(Done done, bool may_sleep) {
  const auto start = std::chrono::steady_clock::now();
  for (uint32_t spins = 1;; ++spins) {
    if (done()) return true;
    if (spins % 64) {
      cpu_relax();
      continue;
    }
    const auto waited = std::chrono::steady_clock::now() - start;
    if (may_sleep && waited > kSpinBeforeSleep) return false;
    if (waited > kSpinBeforeYield) sched_yield();
  }
}

constexpr int kSizeBits = 16;
constexpr int kMaxThreads = (1 << kSizeBits) - 1;

}  // namespace

struct TeamState {
  std::mutex busy;
  std::atomic<uint64_t> call{0};    // sequence << kSizeBits | team size
  void (*body)(Team&, const void*) = nullptr;
  const void* arg = nullptr;
  std::atomic<int> running{0};
  std::atomic<int> arrived{0};
  std::atomic<uint64_t> phase{0};
  int workers = 0;                  // threads started (members 1 .. workers); guarded by busy
  std::mutex sleep_mutex;
  std::condition_variable wake;
  std::atomic<int> sleepers{0};
};

namespace {

TeamState* pool = new TeamState;   // never freed: detached workers use it until the process ends
thread_local bool inside_call = false;

void work(TeamState* state, int index) {
  inside_call = true;   // a body's nested parallel() runs alone
  uint64_t seen = 0;
  for (;;) {
    const auto changed = [&] { return state->call.load(std::memory_order_acquire) != seen; };
    if (!spin_until(changed, true)) {
      std::unique_lock<std::mutex> lock(state->sleep_mutex);
      state->sleepers.fetch_add(1);
      state->wake.wait(lock, [&] { return state->call.load() != seen; });
      state->sleepers.fetch_sub(1);
    }
    seen = state->call.load(std::memory_order_acquire);
    const int size = (int)(seen & kMaxThreads);
    if (index < size) {
      Team team(index, size, state);
      state->body(team, state->arg);
      state->running.fetch_sub(1, std::memory_order_release);
    }
  }
}

// A forked child has none of the parent's workers: it starts a pool of its own on first use.
void reset_in_child() { pool = new TeamState; }
const int registered_fork_handler = pthread_atfork(nullptr, nullptr, reset_in_child);

}  // namespace

void Team::barrier(bool (*idle)(void*), void* arg) {
  if (size_ == 1) return;
  const uint64_t phase = state_->phase.load(std::memory_order_acquire);
  if (state_->arrived.fetch_add(1, std::memory_order_acq_rel) == size_ - 1) {
    state_->arrived.store(0, std::memory_order_relaxed);
    state_->phase.store(phase + 1, std::memory_order_release);
  } else {
    bool busy = idle != nullptr;
    spin_until([&] {
      if (state_->phase.load(std::memory_order_acquire) != phase) return true;
      if (busy) busy = idle(arg);
      return false;
    }, false);
  }
}

void parallel(int threads, void (*body)(Team&, const void*), const void* arg) {
  (void)registered_fork_handler;
  TeamState* state = pool;
  std::unique_lock<std::mutex> lock(state->busy, std::defer_lock);
  threads = threads < kMaxThreads ? threads : kMaxThreads;
  if (threads <= 1 || inside_call || !lock.try_lock()) {
    Team alone(0, 1, nullptr);
    body(alone, arg);
    return;
  }
  for (; state->workers < threads - 1; ++state->workers) std::thread(work, state, state->workers + 1).detach();
  state->body = body;
  state->arg = arg;
  state->running.store(threads - 1, std::memory_order_relaxed);
  const uint64_t sequence = (state->call.load(std::memory_order_relaxed) >> kSizeBits) + 1;
  state->call.store(sequence << kSizeBits | (uint64_t)threads);   // seq_cst: before the sleepers read (see the top)
  if (state->sleepers.load() > 0) {
    std::lock_guard<std::mutex> guard(state->sleep_mutex);
    state->wake.notify_all();
  }
  inside_call = true;
  Team caller(0, threads, state);
  body(caller, arg);
  inside_call = false;
  spin_until([&] { return state->running.load(std::memory_order_acquire) == 0; }, false);
}
