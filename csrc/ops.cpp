// The torch.ops.lorecomm operators (docs/OPS.md): declarations and CPU kernels.
//
// Every op works on a batch of (a x b) matrices with arbitrary strides. Work
// is split into (matrix, column block) tasks run with at::parallel_for; a
// task loads its block of H = G + E once into an fp32 scratch buffer sized to
// stay in L2, and does all its maths on that block while it is hot. GEMMs go
// straight to the CPU BLAS (the sgemm_ torch links) with explicit
// leading dimensions: no dispatcher round trip, no proxy copies of strided
// outputs, and no layout-dependent slow paths (torch.mm of a transposed
// 1024x1024 by 1024x4 measured ~25x slower than the same sgemm; see
// bench/KERNELS.md). Fake (meta) kernels live in lorecomm/ops.py.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "philox.h"

namespace lorecomm {
namespace {

using at::Tensor;

// Columns per task: an (a x bc) fp32 block of ~4 MiB, at least 16 columns, a
// multiple of 16. Wide blocks keep the rank-r GEMMs efficient (the BLAS call
// per block dominates); measured on the CI's 2-core EPYC (bench/KERNELS.md)
// 4 MiB blocks beat the 256 KiB (L2-sized) ones by 10-35% per op for 1024^2
// and 256x688 matrices at r = 16..32. LORECOMM_BLOCK_FLOATS (environment, read
// once) overrides the block size in floats, for tuning.
int64_t block_floats() {
  static const int64_t v = [] {
    const char* s = std::getenv("LORECOMM_BLOCK_FLOATS");
    const long long x = s ? std::atoll(s) : 0;
    return x > 0 ? static_cast<int64_t>(x) : int64_t{1} << 20;
  }();
  return v;
}

int64_t column_block(int64_t a, int64_t b) {
  int64_t bc = block_floats() / std::max<int64_t>(a, 1);
  bc = std::clamp<int64_t>(bc, 16, 4096) / 16 * 16;
  return std::max<int64_t>(1, std::min(bc, b));
}

int64_t cdiv(int64_t x, int64_t y) { return (x + y - 1) / y; }

}  // namespace
}  // namespace lorecomm

// The Fortran BLAS sgemm that CPU builds of torch carry (MKL or OpenBLAS,
// exported by libtorch_cpu); weak, so a build without it still loads and
// takes the ATen fallback below.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

namespace lorecomm {
namespace {

// Row-major C (m x n, ldc) = alpha op(A) op(B) + beta C, op(A) m x k, op(B)
// k x n; A is stored (m x k) row-major, or (k x m) when ta; B likewise.
void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* A,
             int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // a single stored row may carry any row stride; BLAS wants ld >= its columns
  const int64_t acols = ta ? m : k, bcols = tb ? k : n;
  if ((ta ? k : m) == 1) lda = std::max(lda, acols);
  if ((tb ? n : k) == 1) ldb = std::max(ldb, bcols);
  if (m == 1) ldc = std::max(ldc, n);
  constexpr int64_t kMaxInt = 2147483647;
  const bool blas_ok = lda >= std::max<int64_t>(acols, 1) && ldb >= std::max<int64_t>(bcols, 1) &&
                       ldc >= n && std::max({m, n, k, lda, ldb, ldc}) <= kMaxInt;
  if (sgemm_ != nullptr && blas_ok) {
    // BLAS is column-major: row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T
    const char tA = tb ? 'T' : 'N', tB = ta ? 'T' : 'N';
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
    sgemm_(&tA, &tB, &M, &N, &K, &alpha, B, &LDA, A, &LDB, &beta, C, &LDC);
    return;
  }
  auto opt = at::TensorOptions().dtype(at::kFloat);
  auto mat = [&](const float* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    Tensor x = at::from_blob(const_cast<float*>(p), {t ? cols : rows, t ? rows : cols}, {ld, 1}, opt);
    return t ? x.t() : x;
  };
  Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, opt);
  Tensor prod = at::mm(mat(A, m, k, lda, ta), mat(B, k, n, ldb, tb));
  if (beta == 0.f) {
    c.copy_(prod.mul_(alpha));
  } else {
    c.mul_(beta).add_(prod, alpha);
  }
}

// hb[j*n + c] = float(G[j, c0+c]) + E[j, c0+c] for j < a, c < n.
template <typename T>
void load_h(const T* g, int64_t gs0, int64_t gs1, const float* e, int64_t es0, int64_t es1,
            int64_t a, int64_t c0, int64_t n, float* hb) {
  g += c0 * gs1;
  e += c0 * es1;
  if (gs1 == 1 && es1 == 1) {
    for (int64_t j = 0; j < a; ++j) {
      const T* gr = g + j * gs0;
      const float* er = e + j * es0;
      float* h = hb + j * n;
      for (int64_t c = 0; c < n; ++c) h[c] = static_cast<float>(gr[c]) + er[c];
    }
  } else if (gs1 == 1 || es1 == 1 || (gs0 != 1 && es0 != 1)) {
    for (int64_t j = 0; j < a; ++j)
      for (int64_t c = 0; c < n; ++c)
        hb[j * n + c] = static_cast<float>(g[j * gs0 + c * gs1]) + e[j * es0 + c * es1];
  } else {  // column-contiguous (transposed) views: walk down columns
    for (int64_t c = 0; c < n; ++c)
      for (int64_t j = 0; j < a; ++j)
        hb[j * n + c] = static_cast<float>(g[j * gs0 + c * gs1]) + e[j * es0 + c * es1];
  }
}

// dst[j, c0+c] = T(src[j*n + c]) for j < rows, c < n.
template <typename T>
void store_block(const float* src, int64_t rows, int64_t n, T* dst, int64_t ds0, int64_t ds1,
                 int64_t c0) {
  dst += c0 * ds1;
  if (ds1 == 1) {
    for (int64_t j = 0; j < rows; ++j) {
      T* d = dst + j * ds0;
      const float* s = src + j * n;
      for (int64_t c = 0; c < n; ++c) d[c] = static_cast<T>(s[c]);
    }
  } else if (ds0 == 1) {
    for (int64_t c = 0; c < n; ++c)
      for (int64_t j = 0; j < rows; ++j) dst[j + c * ds1] = static_cast<T>(src[j * n + c]);
  } else {
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t c = 0; c < n; ++c) dst[j * ds0 + c * ds1] = static_cast<T>(src[j * n + c]);
  }
}

uint64_t key_at(const Tensor& keys, int64_t i) {
  return static_cast<uint64_t>(keys.data_ptr<int64_t>()[i * keys.stride(0)]);
}

void check_batch3(const char* op, const char* name, const Tensor& t, int64_t B, int64_t rows,
                  int64_t cols) {
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be 3-D (B, rows, cols), got ", t.sizes());
  TORCH_CHECK(t.size(0) == B && t.size(1) == rows && t.size(2) == cols, op, ": ", name,
              " must have shape (", B, ", ", rows, ", ", cols, "), got ", t.sizes());
}

void check_float(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
}

void check_grad(const char* op, const Tensor& G, const Tensor& E) {
  TORCH_CHECK(G.dim() == 3, op, ": G must be 3-D (B, a, b), got ", G.sizes());
  check_batch3(op, "E", E, G.size(0), G.size(1), G.size(2));
  check_float(op, "E", E);
  TORCH_CHECK(at::isFloatingType(G.scalar_type()), op, ": G must be floating, got ",
              G.scalar_type());
}

void check_keys(const char* op, const Tensor& keys, int64_t B) {
  TORCH_CHECK(keys.dim() == 1 && keys.size(0) == B, op, ": keys must have shape (", B,
              ",), got ", keys.sizes());
  TORCH_CHECK(keys.scalar_type() == at::kLong, op, ": keys must be int64, got ",
              keys.scalar_type());
}

// ---------------------------------------------------------------------------
Tensor probe_normal_cpu(const Tensor& keys, int64_t rows, int64_t cols) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "probe_normal: rows and cols must be >= 0");
  TORCH_CHECK(keys.dim() == 1 && keys.scalar_type() == at::kLong,
              "probe_normal: keys must be a 1-D int64 tensor");
  const int64_t B = keys.size(0);
  Tensor out = at::empty({B, rows, cols}, keys.options().dtype(at::kFloat));
  const int64_t n = rows * cols;
  if (B == 0 || n == 0) return out;
  constexpr int64_t kChunk = 4096;
  const int64_t nchunk = cdiv(n, kChunk);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, B * nchunk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / nchunk, off = (t % nchunk) * kChunk;
      randn_fill(key_at(keys, i), static_cast<uint64_t>(off), std::min(kChunk, n - off),
                 o + i * n + off);
    }
  });
  return out;
}

// lam[i, j] = sum_c (U_i^T H_i)[j, c] * randn(key_i, j*b + c)
Tensor score_paper_cpu(const Tensor& G, const Tensor& E, const Tensor& U, const Tensor& keys) {
  const char* op = "score_paper";
  check_grad(op, G, E);
  const int64_t B = G.size(0), a = G.size(1), b = G.size(2);
  check_batch3(op, "U", U, B, a, a);
  check_float(op, "U", U);
  check_keys(op, keys, B);
  Tensor lam = at::empty({B, a}, G.options().dtype(at::kFloat));
  if (B == 0 || a == 0) return lam;
  if (b == 0) return lam.zero_();
  const int64_t bc = column_block(a, b), nblk = cdiv(b, bc);
  const Tensor Uc = U.contiguous();
  const float* u = Uc.const_data_ptr<float>();
  std::vector<float> partial(static_cast<size_t>(B * nblk * a));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "lorecomm::score_paper", [&] {
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    const float* e = E.const_data_ptr<float>();
    at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> hb(a * bc), zb(a * bc), pr(bc);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t i = t / nblk, blk = t % nblk, c0 = blk * bc, n = std::min(bc, b - c0);
        load_h(g + i * G.stride(0), G.stride(1), G.stride(2), e + i * E.stride(0), E.stride(1),
               E.stride(2), a, c0, n, hb.data());
        gemm_rm(true, false, a, n, a, 1.f, u + i * a * a, a, hb.data(), n, 0.f, zb.data(), n);  // Z = U^T H_block
        const uint64_t key = key_at(keys, i);
        float* dst = partial.data() + t * a;
        for (int64_t j = 0; j < a; ++j) {
          randn_fill(key, static_cast<uint64_t>(j * b + c0), n, pr.data());
          const float* z = zb.data() + j * n;
          float s = 0.f;
          for (int64_t c = 0; c < n; ++c) s += z[c] * pr[c];
          dst[j] = s;
        }
      }
    });
  });
  float* l = lam.data_ptr<float>();
  for (int64_t i = 0; i < B; ++i)
    for (int64_t j = 0; j < a; ++j) {
      float s = 0.f;
      for (int64_t blk = 0; blk < nblk; ++blk) s += partial[(i * nblk + blk) * a + j];
      l[i * a + j] = s;
    }
  return lam;
}

// lam[i] = U_i^T (H_i S_i), S_i[c, q] = randn(key_i, c*k + q)
//
// Per column block, Y_blk^T = S_blk^T H_blk^T (k x a) is summed over blocks,
// then lam = U^T Y.
Tensor score_sketch_cpu(const Tensor& G, const Tensor& E, const Tensor& U, const Tensor& keys,
                        int64_t k) {
  const char* op = "score_sketch";
  check_grad(op, G, E);
  TORCH_CHECK(k >= 0, op, ": k must be >= 0");
  const int64_t B = G.size(0), a = G.size(1), b = G.size(2);
  check_batch3(op, "U", U, B, a, a);
  check_float(op, "U", U);
  check_keys(op, keys, B);
  Tensor lam = at::empty({B, a, k}, G.options().dtype(at::kFloat));
  if (B == 0 || a == 0 || k == 0) return lam;
  if (b == 0) return lam.zero_();
  const int64_t bc = column_block(a, b), nblk = cdiv(b, bc);
  const Tensor Uc = U.contiguous();
  std::vector<float> partial(static_cast<size_t>(B * nblk * k * a));  // Y_blk^T, (k x a) each
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "lorecomm::score_sketch", [&] {
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    const float* e = E.const_data_ptr<float>();
    at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> hb(a * bc), sb(bc * k);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t i = t / nblk, blk = t % nblk, c0 = blk * bc, n = std::min(bc, b - c0);
        load_h(g + i * G.stride(0), G.stride(1), G.stride(2), e + i * E.stride(0), E.stride(1),
               E.stride(2), a, c0, n, hb.data());
        randn_fill(key_at(keys, i), static_cast<uint64_t>(c0 * k), n * k, sb.data());
        // Y_blk^T = S_blk^T H_blk^T  (k x a)
        gemm_rm(true, true, k, a, n, 1.f, sb.data(), k, hb.data(), n, 0.f,
                partial.data() + t * k * a, a);
      }
    });
  });
  float* l = lam.data_ptr<float>();
  const float* u = Uc.const_data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> yt(k * a), lt(k * a);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(yt.begin(), yt.end(), 0.f);
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const float* p = partial.data() + (i * nblk + blk) * k * a;
        for (int64_t x = 0; x < k * a; ++x) yt[x] += p[x];
      }
      // lam^T = Y^T U (k x a), then transposed: the (a x k) = U^T Y form is a
      // small-M BLAS call that measured ~10x slower (bench/KERNELS.md)
      gemm_rm(false, false, k, a, a, 1.f, yt.data(), a, u + i * a * a, a, 0.f, lt.data(), a);
      float* li = l + i * a * k;
      for (int64_t j = 0; j < a; ++j)
        for (int64_t q = 0; q < k; ++q) li[j * k + q] = lt[q * a + j];
    }
  });
  return lam;
}

// Y_i = H_i Q_i^T (a x c), Q_i (c x b): a sketch of the range of H_i.
//
// Per column block, Y_blk^T = Q_blk H_blk^T (c x a) is summed over blocks in a
// fixed order (deterministic), then transposed.
Tensor range_sketch_cpu(const Tensor& G, const Tensor& E, const Tensor& Q) {
  const char* op = "range_sketch";
  check_grad(op, G, E);
  const int64_t B = G.size(0), a = G.size(1), b = G.size(2);
  TORCH_CHECK(Q.dim() == 3, op, ": Q must be 3-D (B, c, b), got ", Q.sizes());
  const int64_t c = Q.size(1);
  check_batch3(op, "Q", Q, B, c, b);
  check_float(op, "Q", Q);
  Tensor Y = at::empty({B, a, c}, G.options().dtype(at::kFloat));
  if (B == 0 || a == 0 || c == 0) return Y;
  if (b == 0) return Y.zero_();
  const int64_t bc = column_block(a, b), nblk = cdiv(b, bc);
  const Tensor Qc = Q.stride(2) == 1 ? Q : Q.contiguous();
  const float* q = Qc.const_data_ptr<float>();
  const int64_t qs0 = Qc.stride(0), ldq = Qc.stride(1);
  std::vector<float> partial(static_cast<size_t>(B * nblk * c * a));  // Y_blk^T, (c x a) each
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "lorecomm::range_sketch", [&] {
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    const float* e = E.const_data_ptr<float>();
    at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> hb(a * bc);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t i = t / nblk, blk = t % nblk, c0 = blk * bc, n = std::min(bc, b - c0);
        load_h(g + i * G.stride(0), G.stride(1), G.stride(2), e + i * E.stride(0), E.stride(1),
               E.stride(2), a, c0, n, hb.data());
        // Y_blk^T = Q_blk H_blk^T  (c x a)
        gemm_rm(false, true, c, a, n, 1.f, q + i * qs0 + c0, ldq, hb.data(), n, 0.f,
                partial.data() + t * c * a, a);
      }
    });
  });
  float* y = Y.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> yt(c * a);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(yt.begin(), yt.end(), 0.f);
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const float* p = partial.data() + (i * nblk + blk) * c * a;
        for (int64_t x = 0; x < c * a; ++x) yt[x] += p[x];
      }
      float* yi = y + i * a * c;
      for (int64_t j = 0; j < a; ++j)
        for (int64_t qq = 0; qq < c; ++qq) yi[j * c + qq] = yt[qq * a + j];
    }
  });
  return Y;
}

// R_i = P_i^T H_i rounded to R.dtype; if ok: E_i = H_i - P_i R_i with the rounded
// R (a low-precision wire's rounding error stays in E). One pass over G and E.
void project_residual_cpu(const Tensor& G, const Tensor& E, const Tensor& P, const Tensor& R,
                          const Tensor& ok) {
  const char* op = "project_residual";
  check_grad(op, G, E);
  const int64_t B = G.size(0), a = G.size(1), b = G.size(2);
  TORCH_CHECK(P.dim() == 3, op, ": P must be 3-D (B, a, r), got ", P.sizes());
  const int64_t r = P.size(2);
  check_batch3(op, "P", P, B, a, r);
  check_batch3(op, "R", R, B, r, b);
  check_float(op, "P", P);
  const auto rdt = R.scalar_type();
  TORCH_CHECK(rdt == at::kFloat || rdt == at::kBFloat16 || rdt == at::kHalf, op,
              ": R must be float32, bfloat16 or float16, got ", rdt);
  TORCH_CHECK(ok.numel() == 1 && ok.scalar_type() == at::kBool, op,
              ": ok must be a 0-dim bool tensor");
  const bool update = ok.item<bool>();
  if (B == 0 || b == 0) return;
  if (a == 0) {
    R.zero_();
    return;
  }
  if (r == 0) {  // nothing projected: the residual is all of H
    if (update) E.add_(G.to(at::kFloat));
    return;
  }
  const int64_t bc = column_block(a, b), nblk = cdiv(b, bc);
  const Tensor Pc = P.contiguous();
  const float* p = Pc.const_data_ptr<float>();
  // an fp32 R with unit-stride rows (the runtime's factor buffer) is written in place
  const bool direct = rdt == at::kFloat && R.stride(2) == 1;
  Tensor Rw = direct ? R : at::empty({B, r, b}, R.options().dtype(at::kFloat));
  float* rw = Rw.data_ptr<float>();
  const int64_t rs0 = Rw.stride(0), ldr = Rw.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "lorecomm::project_residual", [&] {
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    float* e = E.data_ptr<float>();
    at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> hb(a * bc);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t i = t / nblk, blk = t % nblk, c0 = blk * bc, n = std::min(bc, b - c0);
        float* ei = e + i * E.stride(0);
        load_h(g + i * G.stride(0), G.stride(1), G.stride(2), ei, E.stride(1), E.stride(2), a,
               c0, n, hb.data());
        const float* pi = p + i * a * r;
        float* rb = rw + i * rs0 + c0;
        gemm_rm(true, false, r, n, a, 1.f, pi, r, hb.data(), n, 0.f, rb, ldr);  // R_blk = P^T H_blk
        if (rdt == at::kBFloat16) {  // round in place: the residual uses what is sent
          for (int64_t q = 0; q < r; ++q)
            for (int64_t c = 0; c < n; ++c) rb[q * ldr + c] = static_cast<float>(c10::BFloat16(rb[q * ldr + c]));
        } else if (rdt == at::kHalf) {
          for (int64_t q = 0; q < r; ++q)
            for (int64_t c = 0; c < n; ++c) rb[q * ldr + c] = static_cast<float>(c10::Half(rb[q * ldr + c]));
        }
        if (update) {
          gemm_rm(false, false, a, n, r, -1.f, pi, r, rb, ldr, 1.f, hb.data(), n);  // H_blk - P R_blk, in cache
          store_block(hb.data(), a, n, ei, E.stride(1), E.stride(2), c0);
        }
      }
    });
  });
  if (!Rw.is_same(R)) R.copy_(Rw);  // exact: the values are already representable in R's dtype
}

// out_i = P_i @ Rbar_i, rounded to out.dtype.
void decompress_cpu(const Tensor& P, const Tensor& Rbar, const Tensor& out) {
  const char* op = "decompress";
  TORCH_CHECK(P.dim() == 3 && Rbar.dim() == 3 && out.dim() == 3, op,
              ": P, Rbar, out must be 3-D");
  const int64_t B = P.size(0), a = P.size(1), r = P.size(2), b = Rbar.size(2);
  check_batch3(op, "Rbar", Rbar, B, r, b);
  check_batch3(op, "out", out, B, a, b);
  check_float(op, "P", P);
  TORCH_CHECK(Rbar.scalar_type() == at::kFloat || Rbar.scalar_type() == at::kBFloat16 ||
                  Rbar.scalar_type() == at::kHalf,
              op, ": Rbar must be float32, bfloat16 or float16, got ", Rbar.scalar_type());
  if (B == 0 || a == 0 || b == 0) return;
  if (r == 0) {
    out.zero_();
    return;
  }
  const int64_t bc = column_block(a, b), nblk = cdiv(b, bc);
  const Tensor Pc = P.contiguous();
  const Tensor Rc = Rbar.scalar_type() != at::kFloat ? Rbar.to(at::kFloat)  // small: r x b
                    : Rbar.stride(2) == 1              ? Rbar
                                                       : Rbar.contiguous();
  const float* p = Pc.const_data_ptr<float>();
  const float* rbar = Rc.const_data_ptr<float>();
  const int64_t rs0 = Rc.stride(0), ldr = Rc.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(),
                                  "lorecomm::decompress", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    // an fp32 output with unit-stride rows takes the GEMM result directly
    const bool direct = std::is_same_v<scalar_t, float> && out.stride(2) == 1;
    at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> ob(direct ? 0 : a * bc);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t i = t / nblk, blk = t % nblk, c0 = blk * bc, n = std::min(bc, b - c0);
        const float* pi = p + i * a * r;
        const float* rb = rbar + i * rs0 + c0;
        if (direct) {
          float* od = reinterpret_cast<float*>(o + i * out.stride(0) + c0);
          gemm_rm(false, false, a, n, r, 1.f, pi, r, rb, ldr, 0.f, od, out.stride(1));
        } else {
          gemm_rm(false, false, a, n, r, 1.f, pi, r, rb, ldr, 0.f, ob.data(), n);
          store_block(ob.data(), a, n, o + i * out.stride(0), out.stride(1), out.stride(2), c0);
        }
      }
    });
  });
}

}  // namespace
}  // namespace lorecomm

TORCH_LIBRARY(lorecomm, m) {
  m.set_python_module("lorecomm.ops");  // fake (meta) kernels are registered there
  m.def("probe_normal(Tensor keys, int rows, int cols) -> Tensor");
  m.def("score_paper(Tensor G, Tensor E, Tensor U, Tensor keys) -> Tensor");
  m.def("score_sketch(Tensor G, Tensor E, Tensor U, Tensor keys, int k) -> Tensor");
  m.def("project_residual(Tensor G, Tensor(a!) E, Tensor P, Tensor(b!) R, Tensor ok) -> ()");
  m.def("decompress(Tensor P, Tensor Rbar, Tensor(a!) out) -> ()");
  m.def("refresh_basis(Tensor H) -> Tensor");  // kernel: csrc/basis.cpp (ATen, every device)
  m.def("range_sketch(Tensor G, Tensor E, Tensor Q) -> Tensor");
  m.def("probe_keys(Tensor ids, int seed, int step, int stream) -> Tensor");  // kernel: csrc/keys.cpp
}

TORCH_LIBRARY_IMPL(lorecomm, CPU, m) {
  m.impl("probe_normal", &lorecomm::probe_normal_cpu);
  m.impl("score_paper", &lorecomm::score_paper_cpu);
  m.impl("score_sketch", &lorecomm::score_sketch_cpu);
  m.impl("range_sketch", &lorecomm::range_sketch_cpu);
  m.impl("project_residual", &lorecomm::project_residual_cpu);
  m.impl("decompress", &lorecomm::decompress_cpu);
}
