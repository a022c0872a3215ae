// Float32 matrix products on the CPU through oneDNN's sgemm, with autograd (internal to model/).
//
// Why not torch::mm: Debian's LibTorch sends float matmuls to OpenBLAS, which on this 2-core machine reaches
// 100-150 GFLOP/s on the engine's shapes (16-4,096 rows by d 192) while oneDNN's JIT sgemm, already a
// dependency of that LibTorch, reaches 200-225 GFLOP/s on the same shapes with LibTorch's own OpenMP threads
// (docs/PERFORMANCE.md; modscope-bench's peak section times both). RuntimeOptions::forTools() gives LibTorch
// every core and OpenBLAS one thread, so that the two thread pools never fight for the cores.
#pragma once

#include <torch/types.h>

namespace modscope::cpu {

// Whether these products apply: a float32 CPU tensor. Everything else (CUDA, other dtypes) takes torch's ops.
bool applies(const torch::Tensor& t);

// Whether autograd must see an operation on a and b: grad mode is on and either requires grad. The fast
// paths (these products' raw forms, cpu_kernels.h's loops) are for when it need not.
bool needsGrad(const torch::Tensor& a, const torch::Tensor& b);

// a [M, K] @ b [K, N] -> [M, N]. Either operand may be any 2-D view whose rows or columns are contiguous (a
// transpose or a column slice is free). Differentiable when grad mode is on and an operand requires grad.
torch::Tensor mm(const torch::Tensor& a, const torch::Tensor& b);

// a [P, M, K] @ b [P, K, N] (+ add, [M, N] broadcast over P, a constant: no gradient flows into it) ->
// [P, M, N], contiguous. Operands as for mm, per batch entry. Differentiable in a and b as mm is.
torch::Tensor bmm(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& add = {});

// a [P, M, K] @ b [P, K, N] (+ beta c) written into c, a [P, M, N] view whose rows are contiguous (any row and
// batch strides: a slice of a wider tensor). No autograd.
void bmmInto(const torch::Tensor& a, const torch::Tensor& b, torch::Tensor& c, float beta = 0.f);

// Raw product into a caller's row-major output: c = a @ b + beta c. No autograd.
void gemmInto(const torch::Tensor& a, const torch::Tensor& b, torch::Tensor& c, float beta);

// The same on raw row-major pointers: c [M, N] (rows ldc apart) = a [M, K] (rows lda apart) @ b [K, N] (rows
// ldb apart) + beta c, the call gemmInto makes for such tensors (the same bits). No autograd.
void gemmRows(const float* a, std::int64_t lda, const float* b, std::int64_t ldb, float* c, std::int64_t ldc,
              std::int64_t M, std::int64_t N, std::int64_t K, float beta);

}  // namespace modscope::cpu
