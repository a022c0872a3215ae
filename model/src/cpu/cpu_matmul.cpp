// oneDNN sgemm behind torch tensors (cpu_matmul.h).
#include "cpu/cpu_matmul.h"
#include "cpu/cpu_signals.h"

#include <torch/autograd.h>

#include <dnnl.h>
#include <dlfcn.h>

#include <algorithm>

namespace modscope::cpu {

namespace {

// A matrix as sgemm reads it: 'N' when its rows are contiguous, 'T' when its columns are (a transposed view),
// with the leading dimension of the row-major matrix underneath. No tensor is touched: the batched product
// runs these inside a parallel region, where no dispatcher state (inference mode) is set.
struct Matrix {
    const float* data;
    std::int64_t rows, cols, s0, s1;
};

struct Operand {
    const float* data;
    char trans;
    std::int64_t ld;
};

bool readable(const Matrix& m, Operand* out) {
    const auto r = m.rows, c = m.cols;
    if ((m.s1 == 1 || c == 1) && (r == 1 || m.s0 >= std::max<std::int64_t>(c, 1))) {
        *out = {m.data, 'N', r == 1 ? std::max<std::int64_t>(c, 1) : m.s0};
        return true;
    }
    if ((m.s0 == 1 || r == 1) && (c == 1 || m.s1 >= std::max<std::int64_t>(r, 1))) {
        *out = {m.data, 'T', c == 1 ? std::max<std::int64_t>(r, 1) : m.s1};
        return true;
    }
    return false;
}

// The last two dimensions of t as sgemm can read them; copied once when neither layout fits.
torch::Tensor readableLayout(const torch::Tensor& t) {
    const auto d = t.dim();
    Operand unused{};
    const Matrix m{nullptr, t.size(d - 2), t.size(d - 1), t.stride(d - 2), t.stride(d - 1)};
    return readable(m, &unused) ? t : t.contiguous();
}

Matrix matrixOf(const torch::Tensor& t, std::int64_t batch = -1) {
    const auto d = t.dim();
    const float* base = t.data_ptr<float>() + (batch >= 0 ? batch * t.stride(0) : 0);
    return {base, t.size(d - 2), t.size(d - 1), t.stride(d - 2), t.stride(d - 1)};
}

// c = a @ b + beta c for row-major c with leading dimension ldc. Returns sgemm's status.
int gemm(const Matrix& a, const Matrix& b, float* c, std::int64_t ldc, float beta) {
    const auto M = a.rows, K = a.cols, N = b.cols;
    if (M == 0 || N == 0) return dnnl_success;
    if (K == 0) {  // sgemm rejects K = 0; the product is zero
        for (std::int64_t i = 0; i < M; ++i)
            for (std::int64_t j = 0; j < N; ++j) c[i * ldc + j] = beta == 0.f ? 0.f : beta * c[i * ldc + j];
        return dnnl_success;
    }
    Operand A{}, B{};
    if (!readable(a, &A) || !readable(b, &B)) return dnnl_invalid_arguments;
    keepSignalsOffThisThread();
    return dnnl_sgemm(A.trans, B.trans, M, N, K, 1.f, A.data, A.ld, B.data, B.ld, beta, c, ldc);
}

void check(int status) {
    TORCH_CHECK(status == dnnl_success, "oneDNN sgemm failed with status ", status);
}

void checkOperands(const torch::Tensor& a, const torch::Tensor& b, std::int64_t dims) {
    TORCH_CHECK(applies(a) && applies(b), "cpu::mm needs float32 CPU tensors");
    TORCH_CHECK(a.dim() == dims && b.dim() == dims, "cpu::mm: expected ", dims, "-D operands");
    TORCH_CHECK(a.size(-1) == b.size(-2), "cpu::mm: shapes ", a.sizes(), " and ", b.sizes(), " do not chain");
}

torch::Tensor rawMm(const torch::Tensor& a_in, const torch::Tensor& b_in) {
    const auto a = readableLayout(a_in), b = readableLayout(b_in);
    auto c = torch::empty({a.size(0), b.size(1)}, a.options());
    check(gemm(matrixOf(a), matrixOf(b), c.data_ptr<float>(), std::max<std::int64_t>(c.size(1), 1), 0.f));
    return c;
}

// c[p] = a[p] @ b[p] + beta c[p] for c's rows contiguous, ldc apart, batch entries cstride apart.
void bmmRaw(const torch::Tensor& a_in, const torch::Tensor& b_in, float* out, std::int64_t ldc, std::int64_t cstride,
            float beta) {
    const auto a = readableLayout(a_in), b = readableLayout(b_in);
    const auto P = a.size(0);
    TORCH_CHECK(b.size(0) == P, "cpu::bmm: batch sizes ", P, " and ", b.size(0), " differ");
    // One product after another, each threaded inside oneDNN. (An at::parallel_for over the batch, meant to give
    // each thread its own products in training, ran them in turn anyway: this file is built without -fopenmp.)
    for (std::int64_t p = 0; p < P; ++p) check(gemm(matrixOf(a, p), matrixOf(b, p), out + p * cstride, ldc, beta));
}

torch::Tensor rawBmm(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& add) {
    const auto P = a.size(0), M = a.size(1), N = b.size(2);
    torch::Tensor c;
    float beta = 0.f;
    if (add.defined()) {
        c = add.expand({P, M, N}).contiguous();
        beta = 1.f;
    } else {
        c = torch::empty({P, M, N}, a.options());
    }
    bmmRaw(a, b, c.data_ptr<float>(), std::max<std::int64_t>(N, 1), M * N, beta);
    return c;
}

// The products' gradients are products again: dA = dC B^T, dB = A^T dC, the transposes free views.
struct MmFunction : torch::autograd::Function<MmFunction> {
    static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& a, const torch::Tensor& b) {
        ctx->save_for_backward({a, b});
        return rawMm(a, b);
    }
    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const auto& g = grads[0];
        if (!ctx->needs_input_grad(1)) return {ctx->needs_input_grad(0) ? rawMm(g, saved[1].t()) : torch::Tensor(), {}};
        // A linear layer's b is its weight's transposed view: dB in that layout, (dC^T A)^T, reaches the weight
        // as a contiguous tensor that AccumulateGrad takes as it is, where a contiguous dB would be copied.
        const auto& b = saved[1];
        const bool b_transposed = b.stride(0) == 1 && b.stride(1) != 1;
        return {ctx->needs_input_grad(0) ? rawMm(g, b.t()) : torch::Tensor(),
                b_transposed ? rawMm(g.t(), saved[0]).t() : rawMm(saved[0].t(), g)};
    }
};

struct BmmFunction : torch::autograd::Function<BmmFunction> {
    // `add` by pointer: not an input of the graph (an undefined tensor may not be one either).
    static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& a, const torch::Tensor& b,
                                 const torch::Tensor* add) {
        ctx->save_for_backward({a, b});
        return rawBmm(a, b, *add);
    }
    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const auto& g = grads[0];
        return {ctx->needs_input_grad(0) ? rawBmm(g, saved[1].transpose(1, 2), {}) : torch::Tensor(),
                ctx->needs_input_grad(1) ? rawBmm(saved[0].transpose(1, 2), g, {}) : torch::Tensor(),
                torch::Tensor()};
    }
};

}  // namespace

bool applies(const torch::Tensor& t) { return t.defined() && t.device().is_cpu() && t.scalar_type() == torch::kFloat32; }

bool needsGrad(const torch::Tensor& a, const torch::Tensor& b) {
    return torch::GradMode::is_enabled() && (a.requires_grad() || b.requires_grad());
}

torch::Tensor mm(const torch::Tensor& a, const torch::Tensor& b) {
    checkOperands(a, b, 2);
    return needsGrad(a, b) ? MmFunction::apply(a, b) : rawMm(a, b);
}

torch::Tensor bmm(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& add) {
    checkOperands(a, b, 3);
    if (add.defined()) {
        TORCH_CHECK(applies(add) && add.dim() == 2 && add.size(0) == a.size(1) && add.size(1) == b.size(2),
                    "cpu::bmm: the added matrix must be float32 [", a.size(1), ", ", b.size(2), "]");
    }
    const auto constant = add.defined() && add.requires_grad() ? add.detach() : add;
    return needsGrad(a, b) ? BmmFunction::apply(a, b, &constant) : rawBmm(a, b, constant);
}

void bmmInto(const torch::Tensor& a, const torch::Tensor& b, torch::Tensor& c, float beta) {
    checkOperands(a, b, 3);
    const auto P = a.size(0), M = a.size(1), N = b.size(2);
    TORCH_CHECK(applies(c) && c.dim() == 3 && c.size(0) == P && c.size(1) == M && c.size(2) == N &&
                    (c.stride(2) == 1 || N == 1) && (M == 1 || c.stride(1) >= N),
                "cpu::bmmInto: the output must be a float32 [", P, ", ", M, ", ", N, "] view with contiguous rows");
    bmmRaw(a, b, c.data_ptr<float>(), M == 1 ? std::max<std::int64_t>(N, 1) : c.stride(1), c.stride(0), beta);
}

void gemmInto(const torch::Tensor& a, const torch::Tensor& b, torch::Tensor& c, float beta) {
    checkOperands(a, b, 2);
    TORCH_CHECK(applies(c) && c.dim() == 2 && c.size(0) == a.size(0) && c.size(1) == b.size(1) &&
                    (c.stride(1) == 1 || c.size(1) == 1) && (c.size(0) == 1 || c.stride(0) >= c.size(1)),
                "cpu::gemmInto: the output must be a row-major float32 [", a.size(0), ", ", b.size(1), "]");
    check(gemm(matrixOf(readableLayout(a)), matrixOf(readableLayout(b)), c.data_ptr<float>(),
               c.size(0) == 1 ? std::max<std::int64_t>(c.size(1), 1) : c.stride(0), beta));
}

void gemmRows(const float* a, std::int64_t lda, const float* b, std::int64_t ldb, float* c, std::int64_t ldc,
              std::int64_t M, std::int64_t N, std::int64_t K, float beta) {
    check(gemm({a, M, K, lda, 1}, {b, K, N, ldb, 1}, c, ldc, beta));
}

}  // namespace modscope::cpu
