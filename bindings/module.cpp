// pybind11 bindings: softrank._C, the native engine. Converts and validates
// numpy buffers and hands raw pointers to the core; no math here. Not built
// against any ML framework. The engine contract is in softrank/_engine.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/cuda_ops.h"
#include "softrank/batched.h"
#include "softrank/cpu_features.h"
#include "softrank/parallel.h"

namespace py = pybind11;
using softrank::index_t;

namespace {

// Releases the GIL for a scope, as py::gil_scoped_release, but its destructor
// may throw. At interpreter exit Python ends a daemon thread that asks for
// the GIL back by pthread_exit, whose forced unwinding must pass through
// this destructor: through pybind11's noexcept one it calls std::terminate,
// and the process aborted at exit (pybind/pybind11#2215).
class GilRelease {
 public:
  GilRelease() : state_(PyEval_SaveThread()) {}
  ~GilRelease() noexcept(false) { PyEval_RestoreThread(state_); }
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;

 private:
  PyThreadState* state_;
};

// Output buffers of the soft operators come from a small cache of recently
// freed ones, keyed by size. Every call returns fresh (rows, n) arrays (out,
// perm, block starts, gradients); through malloc, a call that frees about a
// megabyte at the top of the heap can have it trimmed back to the OS and
// faulted in again on the next call (80 page faults and +60% time per call
// at (1024, 64) in a process that had imported pytest). A training loop calls
// with the same shapes every step, so exact-size reuse keeps those pages.
// Bounded: buffers of 64 KiB to 16 MiB, at most 64 MiB held in all.
class BufferCache {
 public:
  static BufferCache& instance() {
    // Never destroyed: arrays may be freed during interpreter shutdown.
    static BufferCache* cache = new BufferCache;
    return *cache;
  }

  void* acquire(std::size_t bytes) {
    if (cacheable(bytes)) {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->bytes == bytes) {
          void* p = it->ptr;
          held_ -= bytes;
          free_.erase(it);
          return p;
        }
      }
    }
    void* p = std::malloc(bytes);
    if (!p) throw std::bad_alloc();
    return p;
  }

  void release(void* p, std::size_t bytes) {
    if (cacheable(bytes)) {
      std::lock_guard<std::mutex> lock(mutex_);
      while (!free_.empty() && held_ + bytes > kMaxHeld) {  // drop the oldest
        std::free(free_.front().ptr);
        held_ -= free_.front().bytes;
        free_.pop_front();
      }
      free_.push_back({p, bytes});
      held_ += bytes;
      return;
    }
    std::free(p);
  }

 private:
  struct Buffer {
    void* ptr;
    std::size_t bytes;
  };
  static constexpr std::size_t kMinBytes = std::size_t{1} << 16;
  static constexpr std::size_t kMaxBytes = std::size_t{1} << 24;
  static constexpr std::size_t kMaxHeld = std::size_t{1} << 26;
  static bool cacheable(std::size_t bytes) { return bytes >= kMinBytes && bytes <= kMaxBytes; }

  std::mutex mutex_;
  std::deque<Buffer> free_;
  std::size_t held_ = 0;
};

// A new C-contiguous (rows, n) array of `dtype` whose memory comes from (and
// returns to) the BufferCache.
py::array new_rows_array(const py::dtype& dtype, py::ssize_t rows, py::ssize_t n) {
  const std::size_t bytes = static_cast<std::size_t>(rows) * static_cast<std::size_t>(n) *
                            static_cast<std::size_t>(dtype.itemsize());
  if (bytes == 0) return py::array(dtype, {rows, n});
  struct Owned {
    void* ptr;
    std::size_t bytes;
  };
  void* ptr = BufferCache::instance().acquire(bytes);
  py::capsule owner(new Owned{ptr, bytes}, [](void* o) {
    auto* owned = static_cast<Owned*>(o);
    BufferCache::instance().release(owned->ptr, owned->bytes);
    delete owned;
  });
  return py::array(dtype, {rows, n}, {}, ptr, owner);
}

enum class Kind { Float32, Float64 };

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    if (d) s += ", ";
    s += std::to_string(a.shape(d));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Checks that `a` is a C-contiguous 2-D float32/float64 array and returns its kind.
Kind check_values(const py::array& a, const char* name) {
  if (a.ndim() != 2)
    throw py::value_error(std::string(name) + " must be a 2-D (rows, n) array, got shape " +
                          shape_str(a));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous");
  if (a.shape(1) > std::numeric_limits<index_t>::max())
    throw py::value_error(std::string(name) + " rows longer than 2**31 - 1 are not supported");
  if (a.dtype().is(py::dtype::of<float>()))
    return Kind::Float32;
  if (a.dtype().is(py::dtype::of<double>())) return Kind::Float64;
  throw py::type_error(std::string(name) + " must be float32 or float64, got " +
                       std::string(py::str(a.dtype())));
}

void check_same(const py::array& a, const py::array& ref, const char* name, const char* ref_name) {
  if (a.ndim() != 2 || a.shape(0) != ref.shape(0) || a.shape(1) != ref.shape(1))
    throw py::value_error(std::string(name) + " must have the shape of " + ref_name + " " +
                          shape_str(ref) + ", got " + shape_str(a));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous");
}

void check_same_values(const py::array& a, const py::array& ref, const char* name,
                       const char* ref_name) {
  check_same(a, ref, name, ref_name);
  if (!a.dtype().is(ref.dtype()))
    throw py::type_error(std::string(name) + " must have the dtype of " + ref_name + " (" +
                         std::string(py::str(ref.dtype())) + "), got " +
                         std::string(py::str(a.dtype())));
}

void check_indices(const py::array& a, const py::array& ref, const char* name) {
  check_same(a, ref, name, "x");
  if (!a.dtype().is(py::dtype::of<std::int32_t>()))
    throw py::type_error(std::string(name) + " must be int32, got " +
                         std::string(py::str(a.dtype())));
}

softrank::OpSpec make_spec(int op, int reg, bool descending, double eps) {
  if (op != 0 && op != 1) throw py::value_error("op must be 0 (rank) or 1 (sort)");
  if (reg != 0 && reg != 1) throw py::value_error("reg must be 0 (l2) or 1 (kl)");
  if (!(eps >= 0.0)) throw py::value_error("eps must be a number >= 0, got " + std::to_string(eps));
  return softrank::OpSpec{static_cast<softrank::Op>(op), static_cast<softrank::Reg>(reg),
                          descending, eps};
}

template <class T>
T* data_of(py::array& a) {
  return static_cast<T*>(a.mutable_data());
}
template <class T>
const T* cdata_of(const py::array& a) {
  return static_cast<const T*>(a.data());
}

// numpy allows C-contiguous arrays that are not aligned to their item size
// (np.frombuffer with an offset, and np.ascontiguousarray keeps them so):
// reading their elements through a T* is undefined behaviour (UBSan flags
// every load; strict-alignment CPUs may fault). Such an argument is copied
// once into an aligned array; anything else is returned as is, so the
// layout checks still see (and refuse) non-contiguous input.
py::array aligned(const py::array& a) {
  const int flags = a.flags();
  if (!(flags & py::array::c_style) || (flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) return a;
  py::array copy(a.dtype(), std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim()));
  std::memcpy(copy.mutable_data(), a.data(), static_cast<std::size_t>(a.nbytes()));
  return copy;
}

struct ForwardResult {
  py::array out;
  py::array_t<index_t> perm, blocks;  // empty unless the state is kept
};

// The forward pass; keep_state = false returns the values only (the core
// keeps perm and the block starts in per-thread scratch).
ForwardResult run_forward(const py::array& x_arg, int op, int reg, bool descending, double eps,
                          bool keep_state) {
  const py::array x = aligned(x_arg);
  const Kind kind = check_values(x, "x");
  const softrank::OpSpec spec = make_spec(op, reg, descending, eps);
  const std::int64_t rows = x.shape(0);
  const index_t n = static_cast<index_t>(x.shape(1));
  ForwardResult r{new_rows_array(x.dtype(), x.shape(0), x.shape(1)), {}, {}};
  index_t* perm_ptr = nullptr;
  index_t* block_ptr = nullptr;
  if (keep_state) {
    const py::dtype index_dtype = py::dtype::of<index_t>();
    r.perm = new_rows_array(index_dtype, x.shape(0), x.shape(1));
    r.blocks = new_rows_array(index_dtype, x.shape(0), x.shape(1));
    perm_ptr = r.perm.mutable_data();
    block_ptr = r.blocks.mutable_data();
  }
  {
    GilRelease release;
    if (kind == Kind::Float32)
      softrank::soft_forward_batch(cdata_of<float>(x), rows, n, spec, data_of<float>(r.out),
                                   perm_ptr, block_ptr);
    else
      softrank::soft_forward_batch(cdata_of<double>(x), rows, n, spec, data_of<double>(r.out),
                                   perm_ptr, block_ptr);
  }
  return r;
}

py::tuple soft_forward(const py::array& x, int op, int reg, bool descending, double eps) {
  ForwardResult r = run_forward(x, op, reg, descending, eps, true);
  return py::make_tuple(r.out, r.perm, r.blocks);
}

py::array soft_forward_value(const py::array& x, int op, int reg, bool descending, double eps) {
  return run_forward(x, op, reg, descending, eps, false).out;
}

// perm entries index the row: out-of-range values would write out of bounds.
void check_permutation_range(const py::array& perm) {
  const index_t* p = cdata_of<index_t>(perm);
  const std::int64_t size = perm.shape(0) * perm.shape(1);
  const index_t n = static_cast<index_t>(perm.shape(1));
  // One OR over the whole array of two integer compares (the sign bit for
  // p < 0): the compiler vectorises it; a bool &= of the two compares ran
  // one element at a time, 36 us of a (1024, 64) backward (now 9 us).
  std::uint32_t outside = 0;
  for (std::int64_t i = 0; i < size; ++i)
    outside |= static_cast<std::uint32_t>(p[i] >= n) | (static_cast<std::uint32_t>(p[i]) >> 31);
  if (outside != 0) throw py::value_error("perm holds an index outside [0, n): not a forward-pass state");
}

// The arrays a forward pass returned, handed back for a derivative: checked
// together (shapes, dtypes, perm in range). Returns the value kind of x.
Kind check_forward_state(const py::array& x, const py::array& out, const py::array& perm,
                         const py::array& blocks) {
  const Kind kind = check_values(x, "x");
  check_same_values(out, x, "out", "x");
  check_indices(perm, x, "perm");
  check_indices(blocks, x, "block_start");
  check_permutation_range(perm);
  return kind;
}

py::array soft_product(const py::array& x_arg, const py::array& out_arg,
                       const py::array& perm_arg, const py::array& blocks_arg,
                       const py::array& vec_arg, int op, int reg, bool descending, double eps,
                       bool transpose) {
  const py::array x = aligned(x_arg), out = aligned(out_arg), perm = aligned(perm_arg);
  const py::array blocks = aligned(blocks_arg), vec = aligned(vec_arg);
  const Kind kind = check_forward_state(x, out, perm, blocks);
  check_same_values(vec, x, transpose ? "cotangent" : "tangent", "x");
  const softrank::OpSpec spec = make_spec(op, reg, descending, eps);
  const std::int64_t rows = x.shape(0);
  const index_t n = static_cast<index_t>(x.shape(1));
  py::array result = new_rows_array(x.dtype(), x.shape(0), x.shape(1));
  {
    GilRelease release;
    if (kind == Kind::Float32)
      softrank::soft_product_batch(cdata_of<float>(x), cdata_of<float>(out),
                                   cdata_of<index_t>(perm), cdata_of<index_t>(blocks),
                                   cdata_of<float>(vec), rows, n, spec, transpose,
                                   data_of<float>(result));
    else
      softrank::soft_product_batch(cdata_of<double>(x), cdata_of<double>(out),
                                   cdata_of<index_t>(perm), cdata_of<index_t>(blocks),
                                   cdata_of<double>(vec), rows, n, spec, transpose,
                                   data_of<double>(result));
  }
  return result;
}

py::array soft_hvp(const py::array& x_arg, const py::array& out_arg, const py::array& perm_arg,
                   const py::array& blocks_arg, const py::array& cotangent_arg,
                   const py::array& tangent_arg, int op, int reg, bool descending, double eps) {
  const py::array x = aligned(x_arg), out = aligned(out_arg), perm = aligned(perm_arg);
  const py::array blocks = aligned(blocks_arg), cotangent = aligned(cotangent_arg);
  const py::array tangent = aligned(tangent_arg);
  const Kind kind = check_forward_state(x, out, perm, blocks);
  check_same_values(cotangent, x, "cotangent", "x");
  check_same_values(tangent, x, "tangent", "x");
  const softrank::OpSpec spec = make_spec(op, reg, descending, eps);
  const std::int64_t rows = x.shape(0);
  const index_t n = static_cast<index_t>(x.shape(1));
  py::array result = new_rows_array(x.dtype(), x.shape(0), x.shape(1));
  {
    GilRelease release;
    if (kind == Kind::Float32)
      softrank::soft_hvp_batch(cdata_of<float>(x), cdata_of<float>(out), cdata_of<index_t>(perm),
                               cdata_of<index_t>(blocks), cdata_of<float>(cotangent),
                               cdata_of<float>(tangent), rows, n, spec, data_of<float>(result));
    else
      softrank::soft_hvp_batch(cdata_of<double>(x), cdata_of<double>(out),
                               cdata_of<index_t>(perm), cdata_of<index_t>(blocks),
                               cdata_of<double>(cotangent), cdata_of<double>(tangent), rows, n,
                               spec, data_of<double>(result));
  }
  return result;
}

template <class T>
void check_weights_positive(const py::array& w) {
  const T* p = cdata_of<T>(w);
  const std::int64_t size = w.shape(0) * w.shape(1);
  // (One flag over the whole array: compares the compiler vectorises.)
  bool positive_and_finite = true;
  for (std::int64_t i = 0; i < size; ++i)
    positive_and_finite &= p[i] > T(0) && p[i] <= std::numeric_limits<T>::max();
  if (!positive_and_finite) throw py::value_error("weights must be finite and > 0 everywhere");
}

py::tuple isotonic_forward(const py::array& y_arg, const py::object& weights, bool increasing,
                           int reg) {
  if (reg != 0 && reg != 1) throw py::value_error("reg must be 0 (l2) or 1 (kl)");
  const py::array y = aligned(y_arg);
  const Kind kind = check_values(y, "y");
  py::array w;
  const bool weighted = !weights.is_none();
  if (weighted) {
    if (!py::isinstance<py::array>(weights)) throw py::type_error("weights must be an array or None");
    w = aligned(py::reinterpret_borrow<py::array>(weights));
    check_same_values(w, y, "weights", "y");
    if (kind == Kind::Float32)
      check_weights_positive<float>(w);
    else
      check_weights_positive<double>(w);
  }
  const std::int64_t rows = y.shape(0);
  const index_t n = static_cast<index_t>(y.shape(1));
  py::array solution = new_rows_array(y.dtype(), y.shape(0), y.shape(1));
  py::array blocks = new_rows_array(py::dtype::of<index_t>(), y.shape(0), y.shape(1));
  index_t* block_ptr = data_of<index_t>(blocks);
  {
    GilRelease release;
    if (kind == Kind::Float32 && reg == 0)
      softrank::isotonic_forward_batch(cdata_of<float>(y), weighted ? cdata_of<float>(w) : nullptr,
                                       rows, n, increasing, data_of<float>(solution), block_ptr);
    else if (kind == Kind::Float32)
      softrank::isotonic_kl_forward_batch(cdata_of<float>(y),
                                          weighted ? cdata_of<float>(w) : nullptr, rows, n,
                                          increasing, data_of<float>(solution), block_ptr);
    else if (reg == 0)
      softrank::isotonic_forward_batch(cdata_of<double>(y),
                                       weighted ? cdata_of<double>(w) : nullptr, rows, n,
                                       increasing, data_of<double>(solution), block_ptr);
    else
      softrank::isotonic_kl_forward_batch(cdata_of<double>(y),
                                          weighted ? cdata_of<double>(w) : nullptr, rows, n,
                                          increasing, data_of<double>(solution), block_ptr);
  }
  return py::make_tuple(solution, blocks);
}

// projection_forward and (value_only) projection_forward_value: the value
// alone sorts w without its order where it can, and returns out only.
py::object projection_forward_impl(const py::array& z_arg, const py::array& w_arg, double eps,
                                   int reg, bool value_only) {
  const py::array z = aligned(z_arg), w = aligned(w_arg);
  const Kind kind = check_values(z, "z");
  check_same_values(w, z, "w", "z");
  if (reg != 0 && reg != 1) throw py::value_error("reg must be 0 (l2) or 1 (kl)");
  if (!(eps >= 0.0)) throw py::value_error("eps must be a number >= 0, got " + std::to_string(eps));
  const std::int64_t rows = z.shape(0);
  const index_t n = static_cast<index_t>(z.shape(1));
  py::array out = new_rows_array(z.dtype(), z.shape(0), z.shape(1));
  const py::dtype index_dtype = py::dtype::of<index_t>();
  py::array perm_z = new_rows_array(index_dtype, z.shape(0), z.shape(1));
  py::array perm_w = value_only ? py::array(index_dtype, std::vector<py::ssize_t>{0})
                                : new_rows_array(index_dtype, z.shape(0), z.shape(1));
  py::array blocks = new_rows_array(index_dtype, z.shape(0), z.shape(1));
  index_t* pz = data_of<index_t>(perm_z);
  index_t* pw = value_only ? nullptr : data_of<index_t>(perm_w);
  index_t* pb = data_of<index_t>(blocks);
  const auto regularization = static_cast<softrank::Reg>(reg);
  {
    GilRelease release;
    if (kind == Kind::Float32)
      softrank::projection_forward_batch(cdata_of<float>(z), cdata_of<float>(w), rows, n, eps,
                                         regularization, data_of<float>(out), pz, pw, pb);
    else
      softrank::projection_forward_batch(cdata_of<double>(z), cdata_of<double>(w), rows, n, eps,
                                         regularization, data_of<double>(out), pz, pw, pb);
  }
  if (value_only) return std::move(out);
  return py::make_tuple(out, perm_z, perm_w, blocks);
}

py::tuple projection_forward(const py::array& z, const py::array& w, double eps, int reg) {
  return projection_forward_impl(z, w, eps, reg, false);
}

py::array projection_forward_value(const py::array& z, const py::array& w, double eps, int reg) {
  return projection_forward_impl(z, w, eps, reg, true);
}

py::array pearson(const py::array& a_arg, const py::array& b_arg) {
  const py::array a = aligned(a_arg), b = aligned(b_arg);
  const Kind kind = check_values(a, "a");
  check_same_values(b, a, "b", "a");
  const std::int64_t rows = a.shape(0);
  const index_t n = static_cast<index_t>(a.shape(1));
  py::array corr(a.dtype(), std::vector<py::ssize_t>{a.shape(0)});
  {
    GilRelease release;
    if (kind == Kind::Float32)
      softrank::pearson_batch(cdata_of<float>(a), cdata_of<float>(b), rows, n,
                              data_of<float>(corr));
    else
      softrank::pearson_batch(cdata_of<double>(a), cdata_of<double>(b), rows, n,
                              data_of<double>(corr));
  }
  return corr;
}

py::array pearson_vjp(const py::array& a_arg, const py::array& b_arg,
                      const py::array& cotangent_arg) {
  const py::array a = aligned(a_arg), b = aligned(b_arg), cotangent = aligned(cotangent_arg);
  const Kind kind = check_values(a, "a");
  check_same_values(b, a, "b", "a");
  if (cotangent.ndim() != 1 || cotangent.shape(0) != a.shape(0) ||
      !(cotangent.flags() & py::array::c_style))
    throw py::value_error("cotangent must be a contiguous 1-D array of shape (" +
                          std::to_string(a.shape(0)) + ",), got shape " + shape_str(cotangent));
  if (!cotangent.dtype().is(a.dtype()))
    throw py::type_error("cotangent must have the dtype of a (" + std::string(py::str(a.dtype())) +
                         "), got " + std::string(py::str(cotangent.dtype())));
  const std::int64_t rows = a.shape(0);
  const index_t n = static_cast<index_t>(a.shape(1));
  py::array grad = new_rows_array(a.dtype(), a.shape(0), a.shape(1));
  {
    GilRelease release;
    if (kind == Kind::Float32)
      softrank::pearson_vjp_batch(cdata_of<float>(a), cdata_of<float>(b),
                                  cdata_of<float>(cotangent), rows, n, data_of<float>(grad));
    else
      softrank::pearson_vjp_batch(cdata_of<double>(a), cdata_of<double>(b),
                                  cdata_of<double>(cotangent), rows, n, data_of<double>(grad));
  }
  return grad;
}

py::array inverse_permutations(const py::array& perm_arg) {
  const py::array perm = aligned(perm_arg);
  if (perm.ndim() != 2 || !(perm.flags() & py::array::c_style))
    throw py::value_error("perm must be a C-contiguous 2-D (rows, n) array, got shape " +
                          shape_str(perm));
  if (!perm.dtype().is(py::dtype::of<std::int32_t>()))
    throw py::type_error("perm must be int32, got " + std::string(py::str(perm.dtype())));
  const std::int64_t rows = perm.shape(0);
  const std::int64_t n = perm.shape(1);
  py::array inverse = new_rows_array(py::dtype::of<index_t>(), perm.shape(0), perm.shape(1));
  const index_t* p = cdata_of<index_t>(perm);
  index_t* q = data_of<index_t>(inverse);
  bool valid = true;
  {
    GilRelease release;
    for (std::int64_t r = 0; r < rows && valid; ++r) {
      const index_t* row = p + r * n;
      index_t* out = q + r * n;
      for (std::int64_t i = 0; i < n; ++i) out[i] = -1;
      for (std::int64_t i = 0; i < n; ++i) {
        const index_t j = row[i];
        if (j < 0 || j >= n || out[j] != -1) {
          valid = false;
          break;
        }
        out[j] = static_cast<index_t>(i);
      }
    }
  }
  if (!valid) throw py::value_error("perm rows must be permutations of 0, ..., n - 1");
  return inverse;
}

py::array isotonic_vjp(const py::object& weights, const py::array& blocks_arg,
                       const py::array& cotangent_arg) {
  const py::array blocks = aligned(blocks_arg), cotangent = aligned(cotangent_arg);
  const Kind kind = check_values(cotangent, "cotangent");
  check_indices(blocks, cotangent, "block_start");
  py::array w;
  const bool weighted = !weights.is_none();
  if (weighted) {
    if (!py::isinstance<py::array>(weights)) throw py::type_error("weights must be an array or None");
    w = aligned(py::reinterpret_borrow<py::array>(weights));
    check_same_values(w, cotangent, "weights", "cotangent");
  }
  const std::int64_t rows = cotangent.shape(0);
  const index_t n = static_cast<index_t>(cotangent.shape(1));
  py::array grad = new_rows_array(cotangent.dtype(), cotangent.shape(0), cotangent.shape(1));
  {
    GilRelease release;
    if (kind == Kind::Float32)
      softrank::isotonic_vjp_batch(weighted ? cdata_of<float>(w) : nullptr,
                                   cdata_of<index_t>(blocks), cdata_of<float>(cotangent), rows, n,
                                   data_of<float>(grad));
    else
      softrank::isotonic_vjp_batch(weighted ? cdata_of<double>(w) : nullptr,
                                   cdata_of<index_t>(blocks), cdata_of<double>(cotangent), rows,
                                   n, data_of<double>(grad));
  }
  return grad;
}

// Both l2 gradients of a weighted isotonic regression in one pass.
py::tuple isotonic_vjp_weighted(const py::array& y_arg, const py::array& solution_arg,
                                const py::array& weights_arg, const py::array& blocks_arg,
                                const py::array& cotangent_arg) {
  const py::array blocks = aligned(blocks_arg), cotangent = aligned(cotangent_arg);
  const py::array y = aligned(y_arg), solution = aligned(solution_arg), w = aligned(weights_arg);
  const Kind kind = check_values(cotangent, "cotangent");
  check_indices(blocks, cotangent, "block_start");
  check_same_values(y, cotangent, "y", "cotangent");
  check_same_values(solution, cotangent, "solution", "cotangent");
  check_same_values(w, cotangent, "weights", "cotangent");
  const std::int64_t rows = cotangent.shape(0);
  const index_t n = static_cast<index_t>(cotangent.shape(1));
  py::array grad = new_rows_array(cotangent.dtype(), rows, n);
  py::array grad_weights = new_rows_array(cotangent.dtype(), rows, n);
  {
    GilRelease release;
    if (kind == Kind::Float32)
      softrank::isotonic_vjp_batch(cdata_of<float>(w), cdata_of<index_t>(blocks),
                                   cdata_of<float>(cotangent), rows, n, data_of<float>(grad),
                                   cdata_of<float>(y), cdata_of<float>(solution),
                                   data_of<float>(grad_weights));
    else
      softrank::isotonic_vjp_batch(cdata_of<double>(w), cdata_of<index_t>(blocks),
                                   cdata_of<double>(cotangent), rows, n, data_of<double>(grad),
                                   cdata_of<double>(y), cdata_of<double>(solution),
                                   data_of<double>(grad_weights));
  }
  return py::make_tuple(grad, grad_weights);
}

// --- The CUDA core (csrc/cuda/cuda_ops.h) ---------------------------------------
//
// Device buffers arrive as integer addresses (torch's data_ptr(), a stream's
// cuda_stream), so nothing here is built against a framework. Every argument
// that can be checked without the device is checked first (ValueError naming
// it); a build without the core raises RuntimeError, as does a call on a
// machine without a usable device.

void require_cuda_core() {
  if (!softrank::cuda::compiled())
    throw std::runtime_error("softrank was built without the CUDA core");
}

// True for float64, false for float32.
bool cuda_dtype(const std::string& dtype) {
  if (dtype == "float32") return false;
  if (dtype == "float64") return true;
  throw py::value_error("dtype must be 'float32' or 'float64', got '" + dtype + "'");
}

void check_cuda_shape(std::int64_t rows, std::int64_t n) {
  if (rows < 0) throw py::value_error("rows must be >= 0, got " + std::to_string(rows));
  if (n < 1 || n > std::numeric_limits<index_t>::max())
    throw py::value_error("n must be in [1, 2**31 - 1], got " + std::to_string(n));
  // (Beyond any device's memory; keeps the byte counts of the workspace finite.)
  if (rows > (std::int64_t{1} << 48) / n)
    throw py::value_error("rows * n must be at most 2**48, got rows " + std::to_string(rows) +
                          " and n " + std::to_string(n));
}

// A device address; 0 is refused where the batch is not empty.
void* device_pointer(std::uintptr_t address, const char* name, bool needed) {
  if (needed && address == 0)
    throw py::value_error(std::string(name) + " must be a non-null device pointer");
  return reinterpret_cast<void*>(address);
}

void check_workspace(std::size_t needed, std::uint64_t workspace_bytes) {
  if (workspace_bytes < needed)
    throw py::value_error("workspace_bytes must be at least " + std::to_string(needed) +
                          " (cuda_*_workspace), got " + std::to_string(workspace_bytes));
}

std::size_t cuda_forward_workspace(const std::string& dtype, std::int64_t rows, std::int64_t n) {
  require_cuda_core();
  const bool f64 = cuda_dtype(dtype);
  check_cuda_shape(rows, n);
  return softrank::cuda::soft_forward_workspace(f64, rows, static_cast<index_t>(n));
}

std::size_t cuda_product_workspace(const std::string& dtype, std::int64_t rows, std::int64_t n) {
  require_cuda_core();
  const bool f64 = cuda_dtype(dtype);
  check_cuda_shape(rows, n);
  return softrank::cuda::soft_product_workspace(f64, rows, static_cast<index_t>(n));
}

// The checks every cuda_* op makes before its pointers, in this order: the
// build, the dtype, the shape, the operator's parameters.
struct CudaCall {
  bool f64;
  softrank::OpSpec spec;
  bool any;  // rows > 0: something to compute
  CudaCall(const std::string& dtype, std::int64_t rows, std::int64_t n, int op, int reg,
           bool descending, double eps)
      : f64((require_cuda_core(), cuda_dtype(dtype))),
        spec((check_cuda_shape(rows, n), make_spec(op, reg, descending, eps))),
        any(rows > 0) {}
};

void cuda_forward(const std::string& dtype, std::uintptr_t x, std::int64_t rows, std::int64_t n,
                  int op, int reg, bool descending, double eps, std::uintptr_t out,
                  std::uintptr_t perm, std::uintptr_t block_start, std::uintptr_t workspace,
                  std::uint64_t workspace_bytes, std::uintptr_t stream) {
  const CudaCall call(dtype, rows, n, op, reg, descending, eps);
  const bool f64 = call.f64, any = call.any;
  const softrank::OpSpec spec = call.spec;
  void* px = device_pointer(x, "x", any);
  void* pout = device_pointer(out, "out", any);
  void* pperm = device_pointer(perm, "perm", any);
  void* pblocks = device_pointer(block_start, "block_start", any);
  void* pwork = device_pointer(workspace, "workspace", any);
  if (!any) return;
  check_workspace(softrank::cuda::soft_forward_workspace(f64, rows, static_cast<index_t>(n)),
                  workspace_bytes);
  GilRelease release;
  softrank::cuda::soft_forward(f64, px, rows, static_cast<index_t>(n), spec, pout,
                               static_cast<index_t*>(pperm), static_cast<index_t*>(pblocks),
                               pwork, static_cast<std::size_t>(workspace_bytes),
                               reinterpret_cast<void*>(stream));
}

void cuda_product(const std::string& dtype, std::uintptr_t x, std::uintptr_t out,
                  std::uintptr_t perm, std::uintptr_t block_start, std::uintptr_t vec,
                  std::int64_t rows, std::int64_t n, int op, int reg, bool descending, double eps,
                  bool transpose, std::uintptr_t result, std::uintptr_t workspace,
                  std::uint64_t workspace_bytes, std::uintptr_t stream) {
  const CudaCall call(dtype, rows, n, op, reg, descending, eps);
  const bool f64 = call.f64, any = call.any;
  const softrank::OpSpec spec = call.spec;
  void* px = device_pointer(x, "x", any);
  void* pout = device_pointer(out, "out", any);
  void* pperm = device_pointer(perm, "perm", any);
  void* pblocks = device_pointer(block_start, "block_start", any);
  void* pvec = device_pointer(vec, "vec", any);
  void* presult = device_pointer(result, "result", any);
  void* pwork = device_pointer(workspace, "workspace", any);
  if (!any) return;
  check_workspace(softrank::cuda::soft_product_workspace(f64, rows, static_cast<index_t>(n)),
                  workspace_bytes);
  GilRelease release;
  softrank::cuda::soft_product(f64, px, pout, static_cast<const index_t*>(pperm),
                               static_cast<const index_t*>(pblocks), pvec, rows,
                               static_cast<index_t>(n), spec, transpose, presult, pwork,
                               static_cast<std::size_t>(workspace_bytes),
                               reinterpret_cast<void*>(stream));
}

}  // namespace

#ifdef SOFTRANK_WITH_XLA_FFI
#include "xla/ffi/api/c_api.h"

namespace softrank_bindings {
py::dict xla_ffi_targets();  // xla_ffi.cpp
#ifdef SOFTRANK_WITH_CUDA
py::dict xla_ffi_cuda_targets();  // xla_ffi_cuda.cpp
#endif
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "softrank native engine (C++ core); see softrank/_engine.py for the contract";
#ifdef SOFTRANK_WITH_XLA_FFI
  m.def("xla_ffi_targets", &softrank_bindings::xla_ffi_targets,
        "{name: capsule} of the XLA FFI handlers softrank.jax registers (CPU).");
  // The FFI API version the handlers were compiled against (the vendored
  // headers' XLA_FFI_API_MAJOR, _MINOR): softrank.jax checks it against jaxlib's.
  m.attr("xla_ffi_api_version") = py::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
#endif
  m.def(
      "xla_ffi_cuda_targets",
      [] {
#if defined(SOFTRANK_WITH_XLA_FFI) && defined(SOFTRANK_WITH_CUDA)
        return softrank_bindings::xla_ffi_cuda_targets();
#else
        return py::dict();
#endif
      },
      "{name: capsule} of the XLA FFI handlers for platform 'CUDA' (forward, forward_value, "
      "vjp, jvp; the CPU targets' names); empty without the CUDA core.");
  m.def("cuda_compiled", &softrank::cuda::compiled, "Whether this build holds the CUDA core.");
  m.def("cuda_device_count", &softrank::cuda::device_count,
        "The number of usable CUDA devices: 0 without the CUDA core, a driver or a device. "
        "Never raises.");
  m.def("cuda_device_capability", &softrank::cuda::device_capability,
        "The current CUDA device's compute capability, 10 * major + minor; -1 where it "
        "cannot be asked. Never raises.");
  m.def("cuda_device_runs_kernels", &softrank::cuda::device_runs_kernels,
        "Whether this build has a kernel image for the current CUDA device (False for a GPU "
        "older than the architectures it was built for, or without a device). Never raises.");
  m.def("cuda_soft_forward_workspace", &cuda_forward_workspace, py::arg("dtype"), py::arg("rows"),
        py::arg("n"), "Scratch bytes cuda_soft_forward needs for a (rows, n) batch of dtype.");
  m.def("cuda_soft_forward", &cuda_forward, py::arg("dtype"), py::arg("x"), py::arg("rows"),
        py::arg("n"), py::arg("op"), py::arg("reg"), py::arg("descending"), py::arg("eps"),
        py::arg("out"), py::arg("perm"), py::arg("block_start"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("stream"),
        "soft_forward on device buffers (addresses of C-contiguous (rows, n) arrays), enqueued "
        "on `stream` (a cudaStream_t; 0 is the legacy default stream) without synchronising.");
  m.def("cuda_soft_product_workspace", &cuda_product_workspace, py::arg("dtype"), py::arg("rows"),
        py::arg("n"), "Scratch bytes cuda_soft_product needs for a (rows, n) batch of dtype.");
  m.def("cuda_soft_product", &cuda_product, py::arg("dtype"), py::arg("x"), py::arg("out"),
        py::arg("perm"), py::arg("block_start"), py::arg("vec"), py::arg("rows"), py::arg("n"),
        py::arg("op"), py::arg("reg"), py::arg("descending"), py::arg("eps"),
        py::arg("transpose"), py::arg("result"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("stream"),
        "soft_vjp (transpose=True) or soft_jvp of `vec` on device buffers, from the state of "
        "cuda_soft_forward (or soft_forward), enqueued on `stream` without synchronising.");
  m.def("soft_forward", &soft_forward, py::arg("x"), py::arg("op"), py::arg("reg"),
        py::arg("descending"), py::arg("eps"),
        "Soft rank/sort of every row: returns (out, perm, block_start).");
  m.def("soft_forward_value", &soft_forward_value, py::arg("x"), py::arg("op"), py::arg("reg"),
        py::arg("descending"), py::arg("eps"),
        "soft_forward's out alone, without the state for a backward pass.");
  m.def(
      "soft_vjp",
      [](const py::array& x, const py::array& out, const py::array& perm, const py::array& blocks,
         const py::array& cotangent, int op, int reg, bool descending, double eps) {
        return soft_product(x, out, perm, blocks, cotangent, op, reg, descending, eps, true);
      },
      py::arg("x"), py::arg("out"), py::arg("perm"), py::arg("block_start"), py::arg("cotangent"),
      py::arg("op"), py::arg("reg"), py::arg("descending"), py::arg("eps"),
      "Vector-Jacobian product from the stored forward state, O(n) per row.");
  m.def(
      "soft_jvp",
      [](const py::array& x, const py::array& out, const py::array& perm, const py::array& blocks,
         const py::array& tangent, int op, int reg, bool descending, double eps) {
        return soft_product(x, out, perm, blocks, tangent, op, reg, descending, eps, false);
      },
      py::arg("x"), py::arg("out"), py::arg("perm"), py::arg("block_start"), py::arg("tangent"),
      py::arg("op"), py::arg("reg"), py::arg("descending"), py::arg("eps"),
      "Jacobian-vector product from the stored forward state, O(n) per row.");
  m.def("soft_hvp", &soft_hvp, py::arg("x"), py::arg("out"), py::arg("perm"),
        py::arg("block_start"), py::arg("cotangent"), py::arg("tangent"), py::arg("op"),
        py::arg("reg"), py::arg("descending"), py::arg("eps"),
        "Gradient with respect to x of <cotangent, J(x) tangent> (double backward), O(n) per row.");
  m.def("isotonic_forward", &isotonic_forward, py::arg("y"), py::arg("weights"),
        py::arg("increasing"), py::arg("reg") = 0,
        "Weighted isotonic regression, l2 (reg 0) or kl (reg 1): returns (solution, block_start).");
  m.def("pearson", &pearson, py::arg("a"), py::arg("b"),
        "Pearson correlation of each row of a with the same row of b: shape (rows,), NaN for "
        "a constant row.");
  m.def("pearson_vjp", &pearson_vjp, py::arg("a"), py::arg("b"), py::arg("cotangent"),
        "Gradient in a of sum(cotangent * pearson(a, b)), shape (rows, n).");
  m.def("inverse_permutations", &inverse_permutations, py::arg("perm"),
        "inverse[r, perm[r, i]] = i for every row (checked to be permutations).");
  m.def("projection_forward", &projection_forward, py::arg("z"), py::arg("w"), py::arg("eps"),
        py::arg("reg"),
        "Projection of z / eps onto the permutahedron of w, every row: returns (out, perm_z, "
        "perm_w, block_start).");
  m.def("projection_forward_value", &projection_forward_value, py::arg("z"), py::arg("w"),
        py::arg("eps"), py::arg("reg"),
        "projection_forward's out alone, bit for bit (w's values are sorted without their "
        "order where possible).");
  m.def("isotonic_vjp", &isotonic_vjp, py::arg("weights"), py::arg("block_start"),
        py::arg("cotangent"), "Vector-Jacobian product of the isotonic regression.");
  m.def("isotonic_vjp_weighted", &isotonic_vjp_weighted, py::arg("y"), py::arg("solution"),
        py::arg("weights"), py::arg("block_start"), py::arg("cotangent"),
        "Both gradients (y, weights) of a weighted l2 isotonic regression.");
  m.def(
      "set_num_threads",
      [](long long k) {
        if (k < 1 || k > softrank::kMaxThreads)
          throw py::value_error("num_threads must lie in [1, " +
                                std::to_string(softrank::kMaxThreads) + "], got " +
                                std::to_string(k));
        softrank::set_num_threads(static_cast<int>(k));
      },
      py::arg("num_threads"));
  m.def("get_num_threads", &softrank::get_num_threads);
  m.def(
      "codes",
      [] {
        py::dict op, reg, result;
        op["rank"] = static_cast<int>(softrank::Op::Rank);
        op["sort"] = static_cast<int>(softrank::Op::Sort);
        reg["l2"] = static_cast<int>(softrank::Reg::L2);
        reg["kl"] = static_cast<int>(softrank::Reg::KL);
        result["op"] = op;
        result["reg"] = reg;
        return result;
      },
      "The operator and regularization codes of the core's enums: {'op': {...}, 'reg': {...}} "
      "(softrank._codes holds the same table for Python).");
  m.def(
      "simd_level", [] { return softrank::simd_level_name(softrank::simd_level()); },
      "The instruction set the core runs at: 'avx512', 'avx2' or 'baseline' (the CPU's best, "
      "capped by SOFTRANK_DISABLE_AVX512=1, read once when the core loads).");
  m.def(
      "simd_variants_compiled",
      [] {
#if defined(SOFTRANK_X86_DISPATCH)
        return true;
#else
        return false;
#endif
      },
      "Whether the core was built with its x86 AVX2 / AVX-512 variants: False on arm64 and "
      "other non-x86 targets and with SOFTRANK_PORTABLE_ONLY=ON, where simd_level() is "
      "'baseline' on any CPU.");
}
