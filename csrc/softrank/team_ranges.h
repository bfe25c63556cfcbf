// The long-row schedule of soft_forward_sorted (soft_row.h) for a team of
// threads that all run it together: every member computes the row's scalars
// itself (the same values), the data-parallel steps are shared out (ranges:
// a contiguous share each; tasks: round robin) and a serial step runs on
// member 0, each step between two barriers, so that no member still reads
// what a step overwrites and every member sees what it wrote. The CUDA core's
// team is a block of threads, or a cooperative grid, per row of 512 items or
// more (csrc/cuda/soft_ops.cu, "Schedules"); the C++ tests run the same code
// with std::threads (test_block_schedule.cpp).
// Team: rank(), size() and sync() (a barrier of the whole team).
#pragma once

#include <cstdint>

#include "common.h"
#include "pav.h"

namespace softrank {

// Member `rank` of `size` gets [lo, hi) of [0, n): contiguous shares.
SOFTRANK_HD void team_share(index_t n, std::int64_t rank, std::int64_t size, index_t& lo,
                            index_t& hi) {
  const std::int64_t per = (static_cast<std::int64_t>(n) + size - 1) / size;
  const std::int64_t begin = rank * per < n ? rank * per : n;
  const std::int64_t end = begin + per < n ? begin + per : n;
  lo = static_cast<index_t>(begin);
  hi = static_cast<index_t>(end);
}

template <class Team>
struct TeamRanges {
  Team team;
  // The row's PAV chunks (pav.h): the CPU's unless the team's launcher cuts
  // rows to its own size.
  PavChunking chunking = cpu_pav_chunking();
  template <class Fn>
  SOFTRANK_HD void operator()(index_t n, Fn&& fn) const {
    team.sync();
    index_t lo, hi;
    team_share(n, team.rank(), team.size(), lo, hi);
    if (lo < hi) fn(lo, hi);
    team.sync();
  }
  template <class Fn>
  SOFTRANK_HD void tasks(index_t count, Fn&& fn) const {
    team.sync();
    for (std::int64_t t = team.rank(); t < count; t += team.size()) fn(static_cast<index_t>(t));
    team.sync();
  }
  template <class Fn>
  SOFTRANK_HD void single(Fn&& fn) const {
    team.sync();
    if (team.rank() == 0) fn();
    team.sync();
  }
};

// The CUDA core's cut of a team's row (csrc/cuda/soft_ops.cu, "Schedules"):
// rows of kTeamRowMin items or more are a team's; a team of `members` threads
// cuts one into PAV chunks (and product pieces: product_piece_count, with the
// same bounds) of about one per member, at most kMaxTeamJoin of them (their
// joins are serial), at least kMinTeamChunk items each. Here, so that the C++
// tests run the cuts the GPU runs.
constexpr index_t kTeamRowMin = 512;
constexpr index_t kMinTeamChunk = 32;
constexpr index_t kMaxTeamJoin = 2048;

// (max_join: kMaxTeamJoin, unless the CUDA core is told otherwise to measure
// other cuts: soft_ops.cu, max_team_join.)
SOFTRANK_HD PavChunking team_pav_chunking(index_t n, std::int64_t members,
                                          index_t max_join = kMaxTeamJoin) {
  const std::int64_t parts = members < max_join ? members : max_join;
  std::int64_t size = (static_cast<std::int64_t>(n) + parts - 1) / parts;
  if (size < kMinTeamChunk) size = kMinTeamChunk;
  return PavChunking{static_cast<index_t>(size), kTeamRowMin};
}

template <class Team>
SOFTRANK_HD PavChunking pav_chunking_of(const TeamRanges<Team>& ranges) {
  return ranges.chunking;
}

}  // namespace softrank
