// Batched entry points of the softrank core over raw, C-contiguous buffers of
// shape (rows, n). Rows run in parallel on the thread pool; every row is
// computed by the same routine whatever the thread count, so results are
// bitwise identical for any number of threads. Arguments are validated by
// the caller (the bindings) except where noted; these functions do not
// throw for finite or non-finite data.
#pragma once

#include <cstdint>

#include "common.h"

namespace softrank {

// perm and block_start receive the forward state for the products below;
// pass nullptr for both when only `out` is wanted.
template <class T>
void soft_forward_batch(const T* x, std::int64_t rows, index_t n, const OpSpec& spec, T* out,
                        index_t* perm, index_t* block_start);

// transpose = true: vector-Jacobian product; false: Jacobian-vector product.
template <class T>
void soft_product_batch(const T* x, const T* out, const index_t* perm, const index_t* block_start,
                        const T* vec, std::int64_t rows, index_t n, const OpSpec& spec,
                        bool transpose, T* result);

// Gradient with respect to x of <c, J(x) t> (double backward).
template <class T>
void soft_hvp_batch(const T* x, const T* out, const index_t* perm, const index_t* block_start,
                    const T* c, const T* t, std::int64_t rows, index_t n, const OpSpec& spec,
                    T* result);

template <class T>
void isotonic_forward_batch(const T* y, const T* w, std::int64_t rows, index_t n, bool increasing,
                            T* solution, index_t* block_start);

// The projection P(z / eps, w) (reg l2) or P_E(z / eps, w) (kl) of every row
// onto the permutahedron of its w (projection.h): perm_z / perm_w receive the
// columns of z / w at each decreasing sorted position, block_start the PAV
// blocks over sorted positions; inv_z / inv_w, when not null, the inverse
// permutations (inv[perm[i]] = i). w may hold -inf under kl (zeros of e^w)
// where the row's largest w is finite. Rows holding other non-finite values
// get NaN output, identity permutations and singleton blocks. perm_w (and
// then inv_w) may be null: a value-only forward, which sorts w's values
// without their order where it can; out is the same bit for bit.
template <class T>
void projection_forward_batch(const T* z, const T* w, std::int64_t rows, index_t n, double eps,
                              Reg reg, T* out, index_t* perm_z, index_t* perm_w,
                              index_t* block_start, index_t* inv_z = nullptr,
                              index_t* inv_w = nullptr);

// kl isotonic regression (projection.h, IsotonicKlRule); `w` may be null.
// Rows holding NaN or +-inf get NaN and block_start = -1.
template <class T>
void isotonic_kl_forward_batch(const T* y, const T* w, std::int64_t rows, index_t n,
                               bool increasing, T* solution, index_t* block_start);

// grad: the gradient with respect to y. With y, solution and grad_weights
// (w not null), the gradient with respect to the weights too (l2).
template <class T>
void isotonic_vjp_batch(const T* w, const index_t* block_start, const T* cotangent,
                        std::int64_t rows, index_t n, T* grad, const T* y = nullptr,
                        const T* solution = nullptr, T* grad_weights = nullptr);

// The Pearson correlation of each row of a with the same row of b (pearson.h):
// corr has `rows` entries, NaN for a constant row or one holding NaN or inf.
template <class T>
void pearson_batch(const T* a, const T* b, std::int64_t rows, index_t n, T* corr);

// grad (rows, n): the gradient of sum_r cotangent[r] * corr[r] with respect to a.
template <class T>
void pearson_vjp_batch(const T* a, const T* b, const T* cotangent, std::int64_t rows, index_t n,
                       T* grad);

}  // namespace softrank
