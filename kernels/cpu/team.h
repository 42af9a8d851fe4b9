// The CPU kernels' threads: parallel(threads, body) runs body on a team of threads from a persistent
// pool, and the body's phases share work with Team::for_each, which ends in a barrier.
//
// Why not OpenMP: the engine steps its model in a thread of its own (the request router), and libgomp
// keeps one thread pool per thread that has opened a parallel region. With the loading thread's pool
// and the stepping thread's pool alive together there are more OpenMP threads than CPUs, and libgomp
// then all but stops spinning: every region start and every barrier puts threads to sleep on a futex
// and wakes them, and on a 2-vCPU VM that took a GPT-2-small w8a8 decode step from 7.3 ms (stepped
// on the main thread) to 14 ms (stepped by the router), no faster than one thread. This pool's
// workers spin, so a region start or a barrier costs a cache-line transfer, not a wake-up; the pool is
// the same whichever thread calls (a kernel called from a new thread does not start a new team).
//
// Idle workers spin (pause, then yielding the CPU to any other runnable thread) for a short while after
// a call, since the next one usually follows within microseconds (the next layer), and then sleep on a
// condition variable until the next call wakes them.
//
// One call at a time: a second thread calling while the pool is busy runs its body on a team of one
// (itself), as does a body that calls parallel() again. The kernels' results do not depend on the team
// size (each output is one thread's fixed-order sum: batch- and thread-count invariance), so that
// changes the speed only.
#pragma once
#include <cstdint>
#include <utility>

struct TeamState;

// One member's view of a running parallel() call.
class Team {
 public:
  Team(int index, int size, TeamState* state) : index_(index), size_(size), state_(state) {}
  int index() const { return index_; }
  int size() const { return size_; }

  // This member's share [begin, end) of [0, n), a contiguous range: member t gets [t n / size, (t + 1) n / size),
  // as OpenMP's schedule(static).
  std::pair<int64_t, int64_t> share(int64_t n) const { return {n * index_ / size_, n * (index_ + 1) / size_}; }

  // f(i) for each i of this member's share of [0, n), then barrier(): every member's f calls are done,
  // and their writes visible, before any member returns.
  template <class F>
  void for_each(int64_t n, F&& f) {
    for (auto [i, end] = share(n); i < end; ++i) f(i);
    barrier();
  }

  // f(begin, end) once with this member's share of [0, n), then barrier().
  template <class F>
  void for_range(int64_t n, F&& f) {
    const auto [begin, end] = share(n);
    if (begin < end) f(begin, end);
    barrier();
  }

  // Returns once every member has called it (a release by each arrival, an acquire by each departure).
  // While it waits it calls idle(arg), if given, until idle returns false (nothing left to do): a member
  // that finished its share early does useful work in the meantime (stream_gemm.cpp: it prefetches the
  // weights of its share of the next GEMM).
  void barrier(bool (*idle)(void*) = nullptr, void* arg = nullptr);

 private:
  int index_, size_;
  TeamState* state_;
};

// Runs body(team, arg) on `threads` members, the calling thread being member 0; returns when all are done.
void parallel(int threads, void (*body)(Team&, const void*), const void* arg);

template <class F>
void parallel(int threads, const F& body) {
  parallel(threads, [](Team& team, const void* f) { (*static_cast<const F*>(f))(team); }, &body);
}
