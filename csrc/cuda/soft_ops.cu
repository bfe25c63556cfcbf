// The CUDA core: soft rank / soft sort forward passes and their products on
// the GPU. The sort is CUB's radix sort over the CPU's order keys
// (sort_keys.h); every row's PAV, outputs and products are the CPU core's
// host-device routines (soft_row.h), run by one thread per short row and by
// a team of threads per longer one ("Schedules" below), so the GPU computes
// the CPU's blocks and permutation and its outputs up to the roundings of
// block sums (ALGORITHM.md). The
// device code is compiled without FMA contraction (CMakeLists.txt), as the
// CPU core is, so that the PAV merge decisions round as they do there.
//
// Scratch comes only from the caller's workspace; work is enqueued on the
// caller's stream and nothing synchronises with the host.
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>
#include <cooperative_groups.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cuda/cuda_ops.h"
#include "softrank/common.h"
#include "softrank/pav.h"
#include "softrank/projection.h"
#include "softrank/soft_row.h"
#include "softrank/sort_keys.h"
#include "softrank/team_ranges.h"

namespace softrank {
namespace cuda {
namespace {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("softrank CUDA core: ") + what + ": " +
                             cudaGetErrorString(status));
}

// A launch reports a bad configuration only through cudaGetLastError.
void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

// Where the ops' work runs: the calling thread's current device, which must
// exist (no driver or no device is a RuntimeError, not a crash).
void require_device() {
  int device = 0;
  check(cudaGetDevice(&device), "no usable CUDA device");
}

constexpr std::size_t kAlign = 256;
constexpr int kRowThreads = 64;        // threads per block of the one-thread-per-row kernels
constexpr int kElementThreads = 256;   // threads per block of the elementwise kernels
constexpr std::int64_t kMaxBlocks = 1 << 20;

std::size_t align_up(std::size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Cuts aligned buffers from a workspace, in order; with a null base it only
// counts their bytes (the workspace sizes are computed by the same code).
struct Carver {
  char* base;
  std::size_t used = 0;
  template <class U>
  U* take(std::int64_t count) {
    U* p = base ? reinterpret_cast<U*>(base + used) : nullptr;
    used += align_up(static_cast<std::size_t>(count) * sizeof(U));
    return p;
  }
};

// The workspace as handed over may be at any address: its first kAlign
// bytes are spare so that the buffers start aligned.
char* aligned_base(void* workspace) {
  const auto address = reinterpret_cast<std::uintptr_t>(workspace);
  return reinterpret_cast<char*>((address + kAlign - 1) / kAlign * kAlign);
}

unsigned grid_for(std::int64_t items, int threads) {
  const std::int64_t blocks = (items + threads - 1) / threads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// --- The sort ------------------------------------------------------------------
//
// Keys: descending_key(x' + 0) of every element (+0 turns -0 into +0, as on
// the CPU), values: the column. A stable ascending sort of the keys orders
// x' decreasingly with ties in column order: the CPU's permutation (CUB's
// radix sorts are stable, DeviceSegmentedRadixSort by sharing DeviceRadixSort's
// implementation; the tests of ties check the permutation exactly). CUB's
// radix sorts take int item counts, so a batch is sorted in groups of rows
// of at most INT_MAX items, one group per call, in one of three ways
// (sort_method):
// - rows of one item: none (make_keys' order is sorted);
// - one row: DeviceRadixSort, which spreads it over the whole GPU;
// - a few long rows (fewer than kWholeSortRowsMax of kWholeSortRowMin items
//   or more): DeviceSegmentedRadixSort gives each row one thread block, so
//   64 rows of 1e5 would run on 64 multiprocessors, each sorting 1e5 keys
//   alone. Instead the whole group is sorted by key with DeviceRadixSort
//   (values: the item's index in the group), then by row, on the few bits of
//   the row index, by a second, stable DeviceRadixSort: within a row the
//   items keep the key order, ties in column order. The keys are then
//   rebuilt from x by the sorted items (sort_gather_keys). (torch.sort
//   schedules a few long rows the same way.)
// - otherwise: DeviceSegmentedRadixSort, a block per row.

template <class T>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = std::uint32_t;
};
template <>
struct KeyOf<double> {
  using type = std::uint64_t;
};

template <class T, class Key>
__global__ void make_keys(const T* x, std::int64_t total, index_t n, bool negate, Key* keys,
                          index_t* columns) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < total; i += stride) {
    const T v = (negate ? -x[i] : x[i]) + T(0);
    keys[i] = descending_key(v);
    columns[i] = static_cast<index_t>(i % n);
  }
}

// sort_method's kWhole: items[i] = i, the value of the first sort.
__global__ void fill_items(index_t* items, std::int64_t count) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < count; i += stride)
    items[i] = static_cast<index_t>(i);
}

// kWhole: the row of each item (in key order), the second sort's key.
__global__ void rows_of_items(const index_t* items, std::int64_t count, index_t n,
                              std::uint32_t* rows) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < count; i += stride)
    rows[i] = static_cast<std::uint32_t>(items[i] / n);
}

// kWhole: the sorted group's keys and columns from its items in row-then-key
// order (x: the group's first row; keys as make_keys makes them).
template <class T, class Key>
__global__ void sort_gather_keys(const T* x, const index_t* items, std::int64_t count, index_t n,
                                 bool negate, Key* keys, index_t* columns) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < count; i += stride) {
    const index_t item = items[i];
    const T v = (negate ? -x[item] : x[item]) + T(0);
    keys[i] = descending_key(v);
    columns[i] = item % n;
  }
}

__global__ void fill_offsets(int* offsets, std::int64_t count, index_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < count; i += stride)
    offsets[i] = static_cast<int>(i * n);
}

// Rows per sort call.
std::int64_t rows_per_group(std::int64_t rows, index_t n) {
  const std::int64_t most = INT_MAX / static_cast<std::int64_t>(n);
  return rows < most ? rows : most;
}

enum class SortMethod { kNone, kOneRow, kWhole, kSegmented };
constexpr std::int64_t kWholeSortRowsMax = 128;
constexpr index_t kWholeSortRowMin = 4096;

// Where many short rows sort faster, a block per row or whole then by row,
// is unmeasured (CUB's DeviceSegmentedSort is no option: above 300 segments
// it synchronises the stream). For that measurement (benchmarks/gpu_tune.py)
// SOFTRANK_CUDA_SORT, read once per process, forces the method of every
// batch of two rows or more: "segmented" or "whole"; anything else is ignored.
// (Once per process: the workspace query and the op must agree.)
SortMethod forced_sort_method() {
  static const SortMethod value = [] {
    const char* text = std::getenv("SOFTRANK_CUDA_SORT");
    if (text != nullptr && std::strcmp(text, "segmented") == 0) return SortMethod::kSegmented;
    if (text != nullptr && std::strcmp(text, "whole") == 0) return SortMethod::kWhole;
    return SortMethod::kNone;
  }();
  return value;
}

SortMethod sort_method(std::int64_t count, index_t n) {
  if (n == 1) return SortMethod::kNone;  // (make_keys' order is the sorted one)
  if (count == 1) return SortMethod::kOneRow;
  const SortMethod forced = forced_sort_method();
  if (forced != SortMethod::kNone) return forced;
  if (count < kWholeSortRowsMax && n >= kWholeSortRowMin) return SortMethod::kWhole;
  return SortMethod::kSegmented;
}

// The bits of a row index below `count` (kWhole's second sort): at least 1.
int row_bits(std::int64_t count) {
  int bits = 1;
  while ((std::int64_t{1} << bits) < count) ++bits;
  return bits;
}

// CUB's temporary storage for sorting one group of `group` rows, queried
// with the arguments of the calls in forward().
template <class Key>
std::size_t sort_temp_bytes_for(std::int64_t group, index_t n) {
  cub::DoubleBuffer<Key> keys(nullptr, nullptr);
  cub::DoubleBuffer<index_t> values(nullptr, nullptr);
  std::size_t bytes = 0;
  const int items = static_cast<int>(group * n);
  constexpr int kBits = static_cast<int>(sizeof(Key) * 8);
  switch (sort_method(group, n)) {
    case SortMethod::kNone:
      break;
    case SortMethod::kOneRow:
      check(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys, values, items, 0, kBits),
            "sizing the radix sort");
      break;
    case SortMethod::kWhole: {
      check(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys, values, items, 0, kBits),
            "sizing the radix sort");
      cub::DoubleBuffer<std::uint32_t> row_keys(nullptr, nullptr);
      std::size_t by_row = 0;
      check(cub::DeviceRadixSort::SortPairs(nullptr, by_row, row_keys, values, items, 0,
                                            row_bits(group)),
            "sizing the radix sort by row");
      bytes = by_row > bytes ? by_row : bytes;
      break;
    }
    case SortMethod::kSegmented: {
      int* offsets = nullptr;  // (the call's type: a const int* sizes other kernels)
      check(cub::DeviceSegmentedRadixSort::SortPairs(nullptr, bytes, keys, values, items,
                                                     static_cast<int>(group), offsets,
                                                     offsets + 1, 0, kBits),
            "sizing the segmented radix sort");
      break;
    }
  }
  return bytes;
}

// CUB's temporary storage for every group of a (rows, n) batch: the full
// groups and the last, shorter one.
template <class Key>
std::size_t sort_temp_bytes(std::int64_t rows, index_t n) {
  const std::int64_t group = rows_per_group(rows, n);
  std::size_t bytes = sort_temp_bytes_for<Key>(group, n);
  const std::int64_t rest = rows % group;
  if (rest != 0) {
    const std::size_t more = sort_temp_bytes_for<Key>(rest, n);
    bytes = more > bytes ? more : bytes;
  }
  return bytes;
}

// --- Schedules -------------------------------------------------------------------
//
// A row shorter than kTeamRowMin is one thread's work (SerialRanges: the CPU's
// per-row schedule). A longer row is a team's: one block of kTeamThreads per
// row, or, for a batch of at most kGridRowsMax rows of kGridRowMin items or
// more, the whole grid, launched cooperatively, row after row. A team cuts its
// row into PAV chunks and product pieces of about one per member, at most
// kMaxTeamJoin of them (their joins are serial: pav_merge_chunks and the fragment
// join of soft_product_team), at least kMinTeamChunk items each; every other
// step is shared out over the members (team_ranges.h). The chunks depend only
// on n and the team size that the schedule plans, never on where it runs: a
// cooperative launch that the device refuses falls back to blocks that run
// the same chunks.

// (kTeamRowMin, kMinTeamChunk, kMaxTeamJoin and the chunks: team_ranges.h)
//
// The serial joins cost O(chunks) dependent global loads on one thread, the
// chunks' PAV O(n / chunks) on each: which count balances them depends on
// the GPU's latencies, which this project has not measured yet. For that
// measurement (benchmarks/gpu_tune.py), SOFTRANK_CUDA_MAX_TEAM_JOIN, read
// once per process, replaces kMaxTeamJoin: an integer from 2 to 65536;
// anything else is ignored.
constexpr int kTeamThreads = 256;
constexpr index_t kGridRowMin = index_t{1} << 20;
constexpr std::int64_t kGridRowsMax = 4;

index_t max_team_join() {
  static const index_t value = [] {
    const char* text = std::getenv("SOFTRANK_CUDA_MAX_TEAM_JOIN");
    if (text == nullptr || *text == '\0') return kMaxTeamJoin;
    char* end = nullptr;
    const long parsed = std::strtol(text, &end, 10);
    if (*end != '\0' || parsed < 2 || parsed > 65536) return kMaxTeamJoin;
    return static_cast<index_t>(parsed);
  }();
  return value;
}

struct BlockTeam {
  __device__ std::int64_t rank() const { return threadIdx.x; }
  __device__ std::int64_t size() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
  __device__ bool all(bool value) const { return __syncthreads_and(value) != 0; }
};

// The grid of a cooperative launch; `flag` is one int of scratch for all().
struct GridTeam {
  int* flag;
  __device__ std::int64_t rank() const {
    return static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  }
  __device__ std::int64_t size() const { return static_cast<std::int64_t>(gridDim.x) * blockDim.x; }
  __device__ void sync() const { cooperative_groups::this_grid().sync(); }
  __device__ bool all(bool value) const {
    sync();
    if (rank() == 0) *flag = 1;
    sync();
    if (!value) *flag = 0;
    sync();
    return *static_cast<volatile int*>(flag) != 0;  // (the next all() starts with a sync)
  }
};

enum class Schedule { kThread, kBlock, kGrid };

// Whether `stream` is capturing a CUDA graph (torch's CUDA graphs, XLA's
// command buffers). A refused launch there invalidates the capture, so the
// kGrid schedule's cooperative launch is not tried, and its rows run as
// blocks (the same chunks). A query that fails (the legacy stream while
// another thread captures) counts as capturing; its error is cleared.
bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    cudaGetLastError();
    return true;
  }
  return status != cudaStreamCaptureStatusNone;
}

struct Plan {
  Schedule schedule;
  std::int64_t members;  // the team's threads (1: a thread per row)
  unsigned grid_blocks;  // kGrid: the cooperative launch's blocks
  PavChunking chunking;
  index_t pieces;        // soft_product_team's pieces
};

// The blocks of kTeamThreads that a cooperative launch of `kernel` may hold
// on the current device, 0 where it cannot launch one.
unsigned cooperative_blocks(const void* kernel) {
  int device = 0, cooperative = 0, sms = 0, per_sm = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device),
        "cudaDeviceGetAttribute");
  if (!cooperative) return 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute");
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kTeamThreads, 0),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  return static_cast<unsigned>(per_sm > 0 ? per_sm * sms : 0);
}

// `grid_kernel`: the cooperative kernel the kGrid schedule would launch.
Plan plan_rows(std::int64_t rows, index_t n, const void* grid_kernel) {
  Plan p{Schedule::kThread, 1, 0, cpu_pav_chunking(), 1};
  if (n < kTeamRowMin) return p;
  p.schedule = Schedule::kBlock;
  p.members = kTeamThreads;
  if (n >= kGridRowMin && rows <= kGridRowsMax) {
    const unsigned blocks = cooperative_blocks(grid_kernel);
    if (blocks > 1) {
      p.schedule = Schedule::kGrid;
      p.grid_blocks = blocks;
      p.members = static_cast<std::int64_t>(blocks) * kTeamThreads;
    }
  }
  const index_t max_join = max_team_join();
  p.chunking = team_pav_chunking(n, p.members, max_join);
  p.pieces = product_piece_count(n, p.members, kMinTeamChunk, max_join);
  return p;
}

// --- PAV and the outputs -----------------------------------------------------------

// What soft_forward_sorted reads of its scratch (RowScratch without the CPU
// sort's buffers); `decay` is null: every row builds its own kl table.
struct DeviceRowScratch {
  double* xs;
  double* work;
  double* work2;
  BlockStack blocks;
  index_t* chunk_first;
  index_t* chunk_last;
  index_t* chunk_end;
  DecayTable* decay;
};

// The per-row buffers of a forward pass over a batch, row r's at r * n (r *
// (n + 1) for the tables, r * chunks for the chunk arrays).
struct ForwardScratch {
  double* xs;
  double* work;
  double* work2;
  index_t* start;
  double* ref;
  double* stat;
  double* stat2;
  double* tail;
  index_t* chunk_first;
  index_t* chunk_last;
  index_t* chunk_end;
  index_t chunks;
  int* flag;  // one int (GridTeam::all)

  // Row r's part of every buffer (its sorted values are xs + r * n).
  __device__ DeviceRowScratch row(std::int64_t r, index_t n) const {
    const std::int64_t off = r * n;
    const std::int64_t table = r * (static_cast<std::int64_t>(n) + 1);
    const std::int64_t chunk = r * chunks;
    return DeviceRowScratch{xs + off,
                            work + table,
                            work2 + table,
                            BlockStack{start + off, ref + off, stat + off, stat2 + off, tail + off},
                            chunk_first + chunk,
                            chunk_last + chunk,
                            chunk_end + chunk,
                            nullptr};
  }
};

// Rows [0, rows) of a sorted group, one thread each: every pointer starts at
// the group's first row.
template <class T, class Key>
__global__ void forward_rows(const Key* keys, const index_t* columns, std::int64_t rows,
                             index_t n, OpSpec spec, T* out, index_t* perm,
                             index_t* block_start, ForwardScratch s) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       r < rows; r += stride) {
    const std::int64_t off = r * n;
    const Key* row_keys = keys + off;
    index_t* row_perm = perm + off;
    index_t* row_blocks = block_start + off;
    T* row_out = out + off;
    double* xs = s.xs + off;
    bool finite = true;
    for (index_t i = 0; i < n; ++i) {
      const auto v = value_of_key(row_keys[i]);
      finite = finite && is_finite_bits(float_bits(v));
      xs[i] = static_cast<double>(v);
      row_perm[i] = columns[off + i];
    }
    if (!finite) {
      fill_non_finite_row(n, row_out, row_perm, row_blocks);
      continue;
    }
    soft_forward_sorted(n, spec, s.row(r, n), row_out, row_perm, row_blocks, SerialRanges{});
  }
}

// Row r of a sorted group by `team`: the keys decoded and the non-finite test
// shared out, then soft_forward_sorted with the team's chunks.
template <class T, class Key, class Team>
__device__ void forward_team_row(const Key* keys, const index_t* columns, std::int64_t r,
                                 index_t n, const OpSpec& spec, T* out, index_t* perm,
                                 index_t* block_start, const ForwardScratch& s,
                                 PavChunking chunking, Team team) {
  const std::int64_t off = r * n;
  const Key* row_keys = keys + off;
  index_t* row_perm = perm + off;
  index_t* row_blocks = block_start + off;
  T* row_out = out + off;
  double* xs = s.xs + off;
  const TeamRanges<Team> ranges{team, chunking};
  index_t lo, hi;
  team_share(n, team.rank(), team.size(), lo, hi);
  bool finite = true;
  for (index_t i = lo; i < hi; ++i) {
    const auto v = value_of_key(row_keys[i]);
    finite = finite && is_finite_bits(float_bits(v));
    xs[i] = static_cast<double>(v);
    row_perm[i] = columns[off + i];
  }
  if (!team.all(finite)) {  // fill_non_finite_row, shared out
    for (index_t i = lo; i < hi; ++i) {
      row_out[i] = static_cast<T>(kNaN);
      row_perm[i] = i;
      row_blocks[i] = -1;
    }
    return;
  }
  soft_forward_sorted(n, spec, s.row(r, n), row_out, row_perm, row_blocks, ranges);
}

template <class T, class Key>
__global__ void __launch_bounds__(kTeamThreads)
    forward_block_rows(const Key* keys, const index_t* columns, index_t n, OpSpec spec, T* out,
                       index_t* perm, index_t* block_start, ForwardScratch s,
                       PavChunking chunking) {
  forward_team_row(keys, columns, blockIdx.x, n, spec, out, perm, block_start, s, chunking,
                   BlockTeam{});
}

// (Every thread runs every row: the team's barriers are the whole grid's.)
template <class T, class Key>
__global__ void __launch_bounds__(kTeamThreads)
    forward_grid_rows(const Key* keys, const index_t* columns, std::int64_t rows, index_t n,
                      OpSpec spec, T* out, index_t* perm, index_t* block_start, ForwardScratch s,
                      PavChunking chunking) {
  for (std::int64_t r = 0; r < rows; ++r)
    forward_team_row(keys, columns, r, n, spec, out, perm, block_start, s, chunking,
                     GridTeam{s.flag});
}

// --- The products ------------------------------------------------------------------
//
// The state (perm, block_start) may come from any caller of the op, and a
// device op cannot check it without a host synchronisation: perm is read
// through ClampedPositions (an entry outside [0, n) reads as 0) and the
// block starts as soft_row.h reads them (runs, and clamped positions in
// soft_product_team), so a forged state gives unspecified products, never an
// access outside its row. The ops' own forward passes always hand a valid one.

template <class T>
__global__ void product_rows(const T* x, const T* out, const index_t* perm,
                             const index_t* block_start, const T* vec, std::int64_t rows,
                             index_t n, OpSpec spec, bool transpose, T* result, double* work) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       r < rows; r += stride) {
    const std::int64_t off = r * n;
    soft_product_row(x + off, out + off, ClampedPositions{perm + off, n}, block_start + off,
                     vec + off, n, spec, transpose, result + off, work + off);
  }
}

// soft_product_team's scratch of every row, row r's at r * 2 * pieces.
struct ProductScratch {
  double* lead;
  double* trail;
  index_t* lead_end;
  index_t* trail_end;
  index_t pieces;
  __device__ ProductPieces row(std::int64_t r) const {
    const std::int64_t off = r * 2 * pieces;
    return ProductPieces{lead + off, trail + off, lead_end + off, trail_end + off};
  }
};

template <class T, class Team>
__device__ void product_team_row(const T* x, const T* out, const index_t* perm,
                                 const index_t* block_start, const T* vec, std::int64_t r,
                                 index_t n, const OpSpec& spec, bool transpose, T* result,
                                 double* work, const ProductScratch& s, Team team) {
  const std::int64_t off = r * n;
  soft_product_team(x + off, out + off, ClampedPositions{perm + off, n}, block_start + off,
                    vec + off, n, spec, transpose, result + off, work + off, s.pieces, s.row(r),
                    TeamRanges<Team>{team});
}

template <class T>
__global__ void __launch_bounds__(kTeamThreads)
    product_block_rows(const T* x, const T* out, const index_t* perm, const index_t* block_start,
                       const T* vec, index_t n, OpSpec spec, bool transpose, T* result,
                       double* work, ProductScratch s) {
  product_team_row(x, out, perm, block_start, vec, blockIdx.x, n, spec, transpose, result, work,
                   s, BlockTeam{});
}

template <class T>
__global__ void __launch_bounds__(kTeamThreads)
    product_grid_rows(const T* x, const T* out, const index_t* perm, const index_t* block_start,
                      const T* vec, std::int64_t rows, index_t n, OpSpec spec, bool transpose,
                      T* result, double* work, ProductScratch s) {
  for (std::int64_t r = 0; r < rows; ++r)
    product_team_row(x, out, perm, block_start, vec, r, n, spec, transpose, result, work, s,
                     GridTeam{nullptr});
}

// --- Workspace layouts ---------------------------------------------------------

template <class Key>
struct ForwardLayout {
  Key* keys[2];
  index_t* columns[2];
  int* offsets;
  void* sort_temp;
  std::size_t sort_temp_bytes;
  ForwardScratch rows;
  std::size_t bytes;  // including the kAlign spare bytes at the front
};

template <class Key>
ForwardLayout<Key> forward_layout(char* base, std::int64_t rows, index_t n,
                                  std::size_t sort_temp_bytes, const Plan& plan) {
  const std::int64_t total = rows * n;
  const std::int64_t tables = rows * (static_cast<std::int64_t>(n) + 1);
  const index_t chunks = plan.chunking.count(n);
  Carver c{base};
  ForwardLayout<Key> l;
  l.keys[0] = c.take<Key>(total);
  l.keys[1] = c.take<Key>(total);
  l.columns[0] = c.take<index_t>(total);
  l.columns[1] = c.take<index_t>(total);
  l.offsets = c.take<int>(rows_per_group(rows, n) + 1);
  l.sort_temp = c.take<char>(static_cast<std::int64_t>(sort_temp_bytes));
  l.sort_temp_bytes = sort_temp_bytes;
  l.rows.xs = c.take<double>(total);
  l.rows.work = c.take<double>(tables);
  l.rows.work2 = c.take<double>(tables);
  l.rows.start = c.take<index_t>(total);
  l.rows.ref = c.take<double>(total);
  l.rows.stat = c.take<double>(total);
  l.rows.stat2 = c.take<double>(total);
  l.rows.tail = c.take<double>(total);
  l.rows.chunk_first = c.take<index_t>(rows * chunks);
  l.rows.chunk_last = c.take<index_t>(rows * chunks);
  l.rows.chunk_end = c.take<index_t>(rows * chunks);
  l.rows.chunks = chunks;
  l.rows.flag = c.take<int>(1);
  l.bytes = kAlign + c.used;
  return l;
}

template <class T>
Plan forward_plan(std::int64_t rows, index_t n) {
  using Key = typename KeyOf<T>::type;
  return plan_rows(rows_per_group(rows, n), n,
                   reinterpret_cast<const void*>(&forward_grid_rows<T, Key>));
}

template <class T>
std::size_t forward_workspace(std::int64_t rows, index_t n) {
  using Key = typename KeyOf<T>::type;
  if (rows == 0 || n == 0) return 0;
  require_device();
  return forward_layout<Key>(nullptr, rows, n, sort_temp_bytes<Key>(rows, n),
                             forward_plan<T>(rows, n))
      .bytes;
}

template <class T>
void forward(const T* x, std::int64_t rows, index_t n, const OpSpec& spec, T* out, index_t* perm,
             index_t* block_start, void* workspace, std::size_t workspace_bytes,
             cudaStream_t stream) {
  using Key = typename KeyOf<T>::type;
  if (rows == 0 || n == 0) return;
  require_device();
  const std::size_t temp_bytes = sort_temp_bytes<Key>(rows, n);
  const Plan plan = forward_plan<T>(rows, n);
  const ForwardLayout<Key> sizes = forward_layout<Key>(nullptr, rows, n, temp_bytes, plan);
  if (workspace_bytes < sizes.bytes)
    throw std::invalid_argument("workspace_bytes must be at least " +
                                std::to_string(sizes.bytes) + ", got " +
                                std::to_string(workspace_bytes));
  const ForwardLayout<Key> l =
      forward_layout<Key>(aligned_base(workspace), rows, n, temp_bytes, plan);
  const std::int64_t total = rows * n;
  const std::int64_t group = rows_per_group(rows, n);
  const bool negate = negates_input(spec);
  make_keys<<<grid_for(total, kElementThreads), kElementThreads, 0, stream>>>(
      x, total, n, negate, l.keys[0], l.columns[0]);
  check_launch("make_keys");
  const std::int64_t rest = rows % group;
  if (sort_method(group, n) == SortMethod::kSegmented ||
      (rest != 0 && sort_method(rest, n) == SortMethod::kSegmented)) {
    fill_offsets<<<grid_for(group + 1, kElementThreads), kElementThreads, 0, stream>>>(
        l.offsets, group + 1, n);
    check_launch("fill_offsets");
  }
  for (std::int64_t row0 = 0; row0 < rows; row0 += group) {
    const std::int64_t count = rows - row0 < group ? rows - row0 : group;
    const std::int64_t off = row0 * n;
    cub::DoubleBuffer<Key> keys(l.keys[0] + off, l.keys[1] + off);
    cub::DoubleBuffer<index_t> columns(l.columns[0] + off, l.columns[1] + off);
    std::size_t temp = l.sort_temp_bytes;
    const int items = static_cast<int>(count * n);
    constexpr int kBits = static_cast<int>(sizeof(Key) * 8);
    const Key* sorted_keys = nullptr;
    const index_t* sorted_columns = nullptr;
    switch (sort_method(count, n)) {
      case SortMethod::kNone:
        sorted_keys = keys.Current();
        sorted_columns = columns.Current();
        break;
      case SortMethod::kOneRow:
        check(cub::DeviceRadixSort::SortPairs(l.sort_temp, temp, keys, columns, items, 0, kBits,
                                              stream),
              "radix sort");
        sorted_keys = keys.Current();
        sorted_columns = columns.Current();
        break;
      case SortMethod::kWhole: {
        // By key, the values being the items' indices in the group...
        fill_items<<<grid_for(items, kElementThreads), kElementThreads, 0, stream>>>(
            columns.Current(), items);
        check_launch("fill_items");
        check(cub::DeviceRadixSort::SortPairs(l.sort_temp, temp, keys, columns, items, 0, kBits,
                                              stream),
              "radix sort");
        // ... then by row, stably, with the row indices in the key buffers
        // (the sorted keys are not needed again; a Key holds a uint32).
        cub::DoubleBuffer<std::uint32_t> row_keys(
            reinterpret_cast<std::uint32_t*>(l.keys[0] + off),
            reinterpret_cast<std::uint32_t*>(l.keys[1] + off));
        rows_of_items<<<grid_for(items, kElementThreads), kElementThreads, 0, stream>>>(
            columns.Current(), items, n, row_keys.Current());
        check_launch("rows_of_items");
        temp = l.sort_temp_bytes;
        check(cub::DeviceRadixSort::SortPairs(l.sort_temp, temp, row_keys, columns, items, 0,
                                              row_bits(count), stream),
              "radix sort by row");
        // The keys and columns of the items in that order (the row keys are
        // dead: their buffer takes the keys).
        Key* gathered_keys = l.keys[0] + off;
        index_t* gathered_columns = columns.Alternate();
        sort_gather_keys<<<grid_for(items, kElementThreads), kElementThreads, 0, stream>>>(
            x + off, columns.Current(), items, n, negate, gathered_keys, gathered_columns);
        check_launch("sort_gather_keys");
        sorted_keys = gathered_keys;
        sorted_columns = gathered_columns;
        break;
      }
      case SortMethod::kSegmented:
        check(cub::DeviceSegmentedRadixSort::SortPairs(l.sort_temp, temp, keys, columns, items,
                                                       static_cast<int>(count), l.offsets,
                                                       l.offsets + 1, 0, kBits, stream),
              "segmented radix sort");
        sorted_keys = keys.Current();
        sorted_columns = columns.Current();
        break;
    }
    ForwardScratch s = l.rows;
    const std::int64_t table = row0 * (static_cast<std::int64_t>(n) + 1);
    s.xs += off;
    s.work += table;
    s.work2 += table;
    s.start += off;
    s.ref += off;
    s.stat += off;
    s.stat2 += off;
    s.tail += off;
    s.chunk_first += row0 * s.chunks;
    s.chunk_last += row0 * s.chunks;
    s.chunk_end += row0 * s.chunks;
    T* group_out = out + off;
    index_t* group_perm = perm + off;
    index_t* group_blocks = block_start + off;
    bool launched = false;
    if (plan.schedule == Schedule::kGrid && count <= kGridRowsMax && !capturing(stream)) {
      PavChunking chunking = plan.chunking;
      std::int64_t rows_arg = count;
      index_t n_arg = n;
      OpSpec spec_arg = spec;
      void* args[] = {&sorted_keys, &sorted_columns, &rows_arg, &n_arg,     &spec_arg,
                      &group_out,   &group_perm,     &group_blocks, &s,     &chunking};
      const cudaError_t status = cudaLaunchCooperativeKernel(
          reinterpret_cast<const void*>(&forward_grid_rows<T, Key>), plan.grid_blocks,
          kTeamThreads, args, 0, stream);
      if (status == cudaSuccess) {
        launched = true;
      } else {
        cudaGetLastError();  // (refused: the blocks below run the same chunks)
      }
    }
    if (!launched && plan.schedule != Schedule::kThread) {
      forward_block_rows<<<static_cast<unsigned>(count), kTeamThreads, 0, stream>>>(
          sorted_keys, sorted_columns, n, spec, group_out, group_perm, group_blocks, s,
          plan.chunking);
      check_launch("forward_block_rows");
    } else if (!launched) {
      forward_rows<<<grid_for(count, kRowThreads), kRowThreads, 0, stream>>>(
          sorted_keys, sorted_columns, count, n, spec, group_out, group_perm, group_blocks, s);
      check_launch("forward_rows");
    }
  }
}

template <class T>
Plan product_plan(std::int64_t rows, index_t n) {
  return plan_rows(rows, n, reinterpret_cast<const void*>(&product_grid_rows<T>));
}

struct ProductLayout {
  double* work;
  ProductScratch pieces;
  std::size_t bytes;  // including the kAlign spare bytes at the front
};

ProductLayout product_layout(char* base, std::int64_t rows, index_t n, const Plan& plan) {
  Carver c{base};
  ProductLayout l;
  l.work = c.take<double>(rows * n);
  const std::int64_t slots = plan.schedule == Schedule::kThread ? 0 : rows * 2 * plan.pieces;
  l.pieces = ProductScratch{c.take<double>(slots), c.take<double>(slots),
                            c.take<index_t>(slots), c.take<index_t>(slots), plan.pieces};
  l.bytes = kAlign + c.used;
  return l;
}

template <class T>
std::size_t product_workspace(std::int64_t rows, index_t n) {
  if (rows == 0 || n == 0) return 0;
  require_device();
  return product_layout(nullptr, rows, n, product_plan<T>(rows, n)).bytes;
}

template <class T>
void product(const T* x, const T* out, const index_t* perm, const index_t* block_start,
             const T* vec, std::int64_t rows, index_t n, const OpSpec& spec, bool transpose,
             T* result, void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  if (rows == 0 || n == 0) return;
  require_device();
  const Plan plan = product_plan<T>(rows, n);
  const std::size_t needed = product_layout(nullptr, rows, n, plan).bytes;
  if (workspace_bytes < needed)
    throw std::invalid_argument("workspace_bytes must be at least " + std::to_string(needed) +
                                ", got " + std::to_string(workspace_bytes));
  const ProductLayout l = product_layout(aligned_base(workspace), rows, n, plan);
  double* work = l.work;
  ProductScratch pieces = l.pieces;
  if (plan.schedule == Schedule::kGrid && !capturing(stream)) {
    std::int64_t rows_arg = rows;
    index_t n_arg = n;
    OpSpec spec_arg = spec;
    bool transpose_arg = transpose;
    void* args[] = {&x,        &out,       &perm,          &block_start, &vec,  &rows_arg,
                    &n_arg,    &spec_arg,  &transpose_arg, &result,      &work, &pieces};
    const cudaError_t status =
        cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(&product_grid_rows<T>),
                                    plan.grid_blocks, kTeamThreads, args, 0, stream);
    if (status == cudaSuccess) return;
    cudaGetLastError();  // (refused: the blocks below cut the same pieces)
  }
  if (plan.schedule != Schedule::kThread) {
    // (A team's row holds kTeamRowMin items or more: rows is far below the grid limit.)
    product_block_rows<<<static_cast<unsigned>(rows), kTeamThreads, 0, stream>>>(
        x, out, perm, block_start, vec, n, spec, transpose, result, work, pieces);
    check_launch("product_block_rows");
  } else {
    product_rows<<<grid_for(rows, kRowThreads), kRowThreads, 0, stream>>>(
        x, out, perm, block_start, vec, rows, n, spec, transpose, result, work);
    check_launch("product_rows");
  }
}

}  // namespace

bool compiled() noexcept { return true; }

int device_count() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // (clears the failure, which is not sticky, for later calls)
    return 0;
  }
  return count;
}

int device_capability() noexcept {
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return 10 * major + minor;
}

bool device_runs_kernels() noexcept {
  // Any of the core's kernels: all are built for the same architectures.
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, fill_items) != cudaSuccess) {
    cudaGetLastError();  // (cudaErrorNoKernelImageForDevice is not sticky)
    return false;
  }
  return true;
}

std::size_t soft_forward_workspace(bool f64, std::int64_t rows, index_t n) {
  return f64 ? forward_workspace<double>(rows, n) : forward_workspace<float>(rows, n);
}

std::size_t soft_product_workspace(bool f64, std::int64_t rows, index_t n) {
  return f64 ? product_workspace<double>(rows, n) : product_workspace<float>(rows, n);
}

void soft_forward(bool f64, const void* x, std::int64_t rows, index_t n, const OpSpec& spec,
                  void* out, index_t* perm, index_t* block_start, void* workspace,
                  std::size_t workspace_bytes, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (f64)
    forward(static_cast<const double*>(x), rows, n, spec, static_cast<double*>(out), perm,
            block_start, workspace, workspace_bytes, s);
  else
    forward(static_cast<const float*>(x), rows, n, spec, static_cast<float*>(out), perm,
            block_start, workspace, workspace_bytes, s);
}

void soft_product(bool f64, const void* x, const void* out, const index_t* perm,
                  const index_t* block_start, const void* vec, std::int64_t rows, index_t n,
                  const OpSpec& spec, bool transpose, void* result, void* workspace,
                  std::size_t workspace_bytes, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (f64)
    product(static_cast<const double*>(x), static_cast<const double*>(out), perm, block_start,
            static_cast<const double*>(vec), rows, n, spec, transpose,
            static_cast<double*>(result), workspace, workspace_bytes, s);
  else
    product(static_cast<const float*>(x), static_cast<const float*>(out), perm, block_start,
            static_cast<const float*>(vec), rows, n, spec, transpose,
            static_cast<float*>(result), workspace, workspace_bytes, s);
}

}  // namespace cuda
}  // namespace softrank
