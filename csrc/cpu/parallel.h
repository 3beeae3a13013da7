// The CPU kernels' parallel loop: a small pool whose caller never waits for a thread that has
// not started.
//
// Why not at::parallel_for (OpenMP in torch's builds): an OpenMP parallel region ends at a
// barrier that every thread of the team must reach.  When another process holds a core (a
// DataLoader worker, a second training job, anything on a shared machine), a team thread may
// not be scheduled for a whole time slice, and the caller waits for it at every region: measured
// on the 2-core machine with one competing process, the fresh-input QFL step at 40000 x 80 went
// from 2.2 ms to 33 ms, DFL 32000 x 17 from 0.6 to 4.8 ms (one thread: 3.7 and 0.8 ms;
// benchmarks/README.md, "Fresh inputs").  Here the range is cut into chunks that threads claim
// from a shared counter: the caller starts on them at once, helpers join when they wake, and at
// the end the caller waits only for chunks a helper has already claimed.  Uncontended, it runs as
// wide as torch.get_num_threads(); contended, no worse than one thread plus one chunk.
//
// Results do not depend on who ran which chunk: every kernel here computes each row on one
// thread, in a fixed order (bitwise identical whatever the thread count or timing).
#pragma once

#include <cstdint>
#include <functional>

namespace gfl::cpu {

// Calls f(b, e) over sub-ranges covering [begin, end) exactly once each.  Runs on the calling
// thread alone when end - begin <= grain, when torch.get_num_threads() is 1, when called from
// inside a parallel region (a helper's chunk, or an OpenMP region of torch's), or while another
// caller is using the pool.  f must not throw (checks belong before the loop); if it does, the
// first exception is rethrown on the caller after every claimed chunk has finished.
void parallel_for(int64_t begin, int64_t end, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& f);

}  // namespace gfl::cpu
