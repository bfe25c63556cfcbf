// IEEE subnormals for the core's arithmetic, whatever the calling thread set.
//
// Frameworks run their CPU threads with subnormals flushed: XLA and
// TensorFlow set flush-to-zero and denormals-are-zero (x86 MXCSR; FZ in
// AArch64's FPCR), and torch.set_flush_denormal(True) sets them on the
// caller's thread. A subnormal input then reads as 0 (jax ranked [3e-40,
// 1e-40, 2e-40] as three ties, numpy as [3, 1, 2]), and which rows saw it
// depended on which thread ran them: the pool's threads inherit the flags of
// the thread that created them. Every batch entry point clears the flags for
// its call on the calling thread (restoring them on return), and the pool's
// threads clear them once when they start, so that every adapter and every
// thread count compute the same bits. Host only.
#pragma once

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#define SOFTRANK_FP_ENV_X86 1
#elif defined(__aarch64__)
#define SOFTRANK_FP_ENV_ARM64 1
#endif

namespace softrank {

namespace fp_env {
#if defined(SOFTRANK_FP_ENV_X86)
constexpr unsigned kFlushBits = 0x8040u;  // MXCSR: flush-to-zero (bit 15), denormals-are-zero (bit 6)
inline unsigned read() { return _mm_getcsr(); }
inline void write(unsigned value) { _mm_setcsr(value); }
#elif defined(SOFTRANK_FP_ENV_ARM64)
constexpr unsigned long kFlushBits = 1ul << 24;  // FPCR.FZ
inline unsigned long read() {
  unsigned long value;
  __asm__ __volatile__("mrs %0, fpcr" : "=r"(value));
  return value;
}
inline void write(unsigned long value) { __asm__ __volatile__("msr fpcr, %0" : : "r"(value)); }
#endif
}  // namespace fp_env

// Clears the flush flags for its lifetime (a no-op where they are clear, or
// on other architectures).
class StandardSubnormals {
 public:
#if defined(SOFTRANK_FP_ENV_X86) || defined(SOFTRANK_FP_ENV_ARM64)
  StandardSubnormals() : saved_(fp_env::read()) {
    if (saved_ & fp_env::kFlushBits) fp_env::write(saved_ & ~fp_env::kFlushBits);
  }
  ~StandardSubnormals() {
    if (saved_ & fp_env::kFlushBits) fp_env::write(saved_);
  }

 private:
  decltype(fp_env::read()) saved_;
#else
  StandardSubnormals() {}
#endif
  StandardSubnormals(const StandardSubnormals&) = delete;
  StandardSubnormals& operator=(const StandardSubnormals&) = delete;
};

// For the core's own threads: clears the flags for good.
inline void use_standard_subnormals() {
#if defined(SOFTRANK_FP_ENV_X86) || defined(SOFTRANK_FP_ENV_ARM64)
  fp_env::write(fp_env::read() & ~fp_env::kFlushBits);
#endif
}

}  // namespace softrank
