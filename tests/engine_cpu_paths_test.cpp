// The engine's CPU fast paths against LibTorch's operators: the matrix products (oneDNN sgemm, cpu_matmul.h),
// values and gradients, for every operand layout the engine hands them, and the thread settings they depend
// on; the fused loops of forwards without autograd (cpu_kernels.h), at each instruction-set level this CPU has
// (isa_levels.h).
#include <QTest>

#include <ATen/Parallel.h>

#include <dlfcn.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <mutex>
#include <numeric>
#include <optional>
#include <set>
#include <thread>

#include "cpu/cpu_kernels.h"
#include "cpu/cpu_matmul.h"
#include "cpu/cpu_signals.h"
#include "adaptive_threads.h"
#include "isa_levels.h"
#include "test_support.h"

using namespace modscope;

namespace {

// Same product in double precision, as the yardstick.
torch::Tensor exact(const torch::Tensor& a, const torch::Tensor& b) {
    return torch::matmul(a.to(torch::kFloat64), b.to(torch::kFloat64)).to(torch::kFloat32);
}

// LibTorch's pool at two threads for a scope, whatever the machine has: the row loops split from 128 rows.
struct TwoThreads {
    int before = at::get_num_threads();
    TwoThreads() { at::set_num_threads(2); }
    ~TwoThreads() { at::set_num_threads(before); }
};

bool close(const torch::Tensor& got, const torch::Tensor& want, double tol = 1e-4) {
    if (got.sizes() != want.sizes()) return false;
    return torch::allclose(got, want, tol, tol);
}

// a [M, K] in a given layout: contiguous, a transposed view, a column slice of a wider matrix (rows not
// packed) or every other column (neither rows nor columns contiguous: copied first).
torch::Tensor inLayout(const torch::Tensor& m, int layout) {
    switch (layout) {
    case 0: return m.contiguous();
    case 1: return m.t().contiguous().t();
    case 2: return torch::cat({m, torch::randn({m.size(0), 5})}, 1).narrow(1, 0, m.size(1));
    default: return torch::stack({m, torch::randn_like(m)}, 2).view({m.size(0), 2 * m.size(1)}).narrow(1, 0, 2 * m.size(1) - 1).slice(1, 0, c10::nullopt, 2);
    }
}

}  // namespace

class EngineCpuPathsTest : public QObject {
    Q_OBJECT

private Q_SLOTS:
    void initTestCase() {
        if (backend::cpuKernelsUsable() == nullptr) QSKIP("the kernel backend is off (MODSCOPE_CPU_KERNELS=0)");
        // Ignored by the kernels: every row would run at the CPU's own level.
        if (!cpu::environmentIsaError().empty()) QFAIL(cpu::environmentIsaError().c_str());
    }

    // isaLevel() is the lowest of the CPU's level, MODSCOPE_CPU_ISA's and the cap setIsaCap set; setIsaCap
    // returns the cap before, ScopedIsaCap puts it back, and the names read back.
    void isaCapSetsTheLevel() {
        using cpu::Isa;
        const auto name = [](Isa isa) { return QString(cpu::isaName(isa)); };
        const Isa top = std::min(cpu::cpuIsa(), cpu::environmentIsaCap());
        QCOMPARE(name(cpu::isaLevel()), name(top));
        QCOMPARE(name(cpu::setIsaCap(Isa::Baseline)), name(Isa::Avx512));  // uncapped until now
        QCOMPARE(name(cpu::isaLevel()), name(Isa::Baseline));
        {
            const cpu::ScopedIsaCap avx2(Isa::Avx2);
            QCOMPARE(name(cpu::isaLevel()), name(std::min(top, Isa::Avx2)));
            QCOMPARE(name(cpu::setIsaCap(Isa::Avx512)), name(Isa::Avx2));
            QCOMPARE(name(cpu::isaLevel()), name(top));  // never above what the CPU and the environment allow
        }
        QCOMPARE(name(cpu::isaLevel()), name(Isa::Baseline));
        QCOMPARE(name(cpu::setIsaCap(Isa::Avx512)), name(Isa::Baseline));
        QCOMPARE(name(cpu::isaLevel()), name(top));
        for (const Isa isa : {Isa::Baseline, Isa::Avx2, Isa::Avx512}) {
            QVERIFY(cpu::isaFromName(cpu::isaName(isa)) == isa);
            QVERIFY(cpu::isaFromName(name(isa).toUpper().toStdString()) == isa);
        }
        QVERIFY(!cpu::isaFromName("x86-64-v3").has_value());
        QVERIFY(!cpu::isaFromName("").has_value());
        QVERIFY(!cpu::isaFromName("avx2 ").has_value());
    }

    // A capped call runs the build of its level: the baseline build's predictor rounds each product before its
    // add, where the AVX2 build fuses them, and GCC contracts SwiGLU's exp polynomial into FMAs in the AVX2 build
    // only; so the baseline bits differ from the AVX2 ones, and repeat themselves.
    void isaCapPicksTheBuild() {
        using cpu::Isa;
        if (const QString unavailable = test::isaUnavailable(Isa::Avx2); !unavailable.isEmpty())
            QSKIP(qPrintable(unavailable + ": no build to tell the baseline one from"));
        torch::manual_seed(31);
        const std::int64_t d = 192, h = 64;
        const auto x = torch::randn({64, d});
        const auto w1_t = torch::randn({d, h}) * 0.1, b1 = torch::randn({h}), w2 = torch::randn({h});
        const auto b2 = torch::full({1}, 0.3);
        const auto gate = torch::linspace(-80.0, 80.0, 64 * 512).view({64, 512});
        const auto gu = torch::cat({gate, torch::randn({64, 512})}, 1);
        const auto run = [&](Isa isa) {
            const cpu::ScopedIsaCap cap(isa);
            return std::make_pair(cpu::predictorLogits(x, w1_t, b1, w2, b2), cpu::swiGlu(gu));
        };
        const auto avx2 = run(Isa::Avx2), baseline = run(Isa::Baseline), again = run(Isa::Baseline);
        QVERIFY(torch::equal(baseline.first, again.first) && torch::equal(baseline.second, again.second));
        QVERIFY2(!torch::equal(baseline.first, avx2.first), "the predictor's logits: the AVX2 build ran capped");
        QVERIFY(close(baseline.first, avx2.first, 1e-5));
        QVERIFY(close(baseline.second, avx2.second, 1e-5));
#ifdef __OPTIMIZE__  // at -O0 (the dev-asan build) GCC fuses nothing
        QVERIFY2(!torch::equal(baseline.second, avx2.second), "SwiGLU: the AVX2 build ran capped");
#endif
    }

    void productsMatchForEveryLayout() {
        torch::manual_seed(1);
        for (const auto& [M, K, N] : std::vector<std::array<int, 3>>{{1, 192, 576}, {16, 192, 1024}, {128, 512, 192},
                                                                       {7, 3, 1}, {1, 1, 1}, {300, 64, 257}}) {
            const auto a = torch::randn({M, K}), b = torch::randn({K, N});
            const auto want = exact(a, b);
            for (int la = 0; la < 4; ++la) {
                for (int lb = 0; lb < 4; ++lb) {
                    const auto A = inLayout(a, la), B = inLayout(b, lb);
                    QVERIFY(torch::equal(A, a) && torch::equal(B, b));
                    QVERIFY2(close(cpu::mm(A, B), want),
                             qPrintable(QString("M %1 K %2 N %3 layouts %4/%5").arg(M).arg(K).arg(N).arg(la).arg(lb)));
                }
            }
        }
    }

    void emptyProductsAreZero() {
        QCOMPARE(cpu::mm(torch::randn({0, 4}), torch::randn({4, 3})).sizes(), torch::IntArrayRef({0, 3}));
        QVERIFY(torch::equal(cpu::mm(torch::randn({2, 0}), torch::randn({0, 3})), torch::zeros({2, 3})));
    }

    void batchedProductsStartFromTheAddedMatrix() {
        torch::manual_seed(2);
        // 3 entries: each product threaded on its own; 48 (a training batch's heads): one product per thread.
        for (const int P : {1, 3, 48}) {
            const auto q = torch::randn({P, 40, 16}), k = torch::randn({P, 56, 16}), v = torch::randn({P, 56, 16});
            auto bias = torch::zeros({40, 56});
            bias.narrow(1, 50, 6).fill_(-1e9);
            const auto kt = k.transpose(1, 2);  // a transposed view per entry, as attention passes it
            const auto want = torch::baddbmm(bias.to(torch::kFloat64), q.to(torch::kFloat64), kt.to(torch::kFloat64));
            QVERIFY2(close(cpu::bmm(q, kt, bias), want.to(torch::kFloat32), 1e-3), qPrintable(QString("P %1").arg(P)));
            QVERIFY(close(cpu::bmm(q, v.narrow(1, 0, 16)), torch::bmm(q, v.narrow(1, 0, 16)), 1e-3));
        }
        QVERIFY_THROWS_EXCEPTION(c10::Error, cpu::bmm(torch::randn({2, 3, 4}), torch::randn({3, 4, 5})));
    }

    void gemmIntoAccumulatesWithBeta() {
        const auto a = torch::randn({5, 6}), b = torch::randn({6, 7});
        auto c = torch::ones({5, 7});
        cpu::gemmInto(a, b, c, 2.f);
        QVERIFY(close(c, exact(a, b) + 2));
        auto wide = torch::zeros({5, 10});
        auto cols = wide.narrow(1, 2, 7);  // rows 10 apart
        cpu::gemmInto(a, b, cols, 0.f);
        QVERIFY(close(cols, exact(a, b)));
        QVERIFY(torch::equal(wide.narrow(1, 0, 2), torch::zeros({5, 2})));
    }

    // Training reads weights through transposed views: the gradients must reach the tensors behind them.
    void gradientsMatchAutogradOfTorch() {
        torch::manual_seed(3);
        const auto x0 = torch::randn({33, 24}), w0 = torch::randn({40, 24});
        auto x = x0.clone().requires_grad_(), w = w0.clone().requires_grad_();
        auto xr = x0.clone().requires_grad_(), wr = w0.clone().requires_grad_();
        const auto g = torch::randn({33, 40});
        (cpu::mm(x, w.t()) * g).sum().backward();
        (torch::mm(xr, wr.t()) * g).sum().backward();
        QVERIFY(close(x.grad(), xr.grad(), 1e-3));
        QVERIFY(close(w.grad(), wr.grad(), 1e-3));

        const auto q0 = torch::randn({6, 20, 8}), k0 = torch::randn({6, 30, 8});
        const auto bias = torch::randn({20, 30});
        auto q = q0.clone().requires_grad_(), k = k0.clone().requires_grad_();
        auto qr = q0.clone().requires_grad_(), kr = k0.clone().requires_grad_();
        const auto gs = torch::randn({6, 20, 30});
        (cpu::bmm(q, k.transpose(1, 2), bias) * gs).sum().backward();
        (torch::baddbmm(bias, qr, kr.transpose(1, 2)) * gs).sum().backward();
        QVERIFY(close(q.grad(), qr.grad(), 1e-3));
        QVERIFY(close(k.grad(), kr.grad(), 1e-3));

        // Only what requires grad gets one.
        auto only = torch::randn({4, 5}).requires_grad_();
        const auto fixed = torch::randn({5, 3});
        cpu::mm(only, fixed).sum().backward();
        QVERIFY(only.grad().defined());
        QVERIFY(!fixed.grad().defined());
    }

    // LibTorch's OpenMP pool drives the products on every core; OpenBLAS, left with whatever product is not
    // ours, must not start a second pool beside it.
    void runtimeGivesTheCoresToOneThreadPool() {
        if (qEnvironmentVariableIsSet("MODSCOPE_TORCH_THREADS")) QSKIP("thread count overridden");
        QCOMPARE(at::get_num_threads(), int(std::max(1u, std::thread::hardware_concurrency())));
        auto* get = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
        if (get == nullptr) QSKIP("the BLAS loaded is not OpenBLAS");
        QCOMPARE(get(), 1);
    }

    void rmsNormMatchesTheOperators_data() { test::isaRows(); }
    void rmsNormMatchesTheOperators() {
        MODSCOPE_CASE_AT_ISA_ROW();
        torch::manual_seed(4);
        nn::RmsNorm norm(37, 1e-5);
        norm->weight.data().uniform_(0.5, 1.5);
        // d 37: the loop's tail after its blocks of eight; rows 50 apart: a column slice read in place.
        const auto wide = torch::randn({3, 11, 50}) * 3;
        const auto many = torch::randn({2, 150, 50}) * 3;  // 300 rows: split over two threads
        const TwoThreads two;
        for (const auto& x : {wide.narrow(2, 0, 37), wide.narrow(2, 5, 37).contiguous(),
                              wide.narrow(2, 0, 37).select(1, 4), many.narrow(2, 0, 37)}) {
            const auto want = x * torch::rsqrt(x.pow(2).mean(-1, true) + 1e-5) * norm->weight;
            const auto fused = cpu::rmsNorm(x, norm->weight.detach(), 1e-5);
            QVERIFY(fused.is_contiguous());
            QVERIFY(close(fused, want.detach(), 1e-5));
            torch::NoGradGuard no_grad;  // the module takes the fused loop only without autograd
            QVERIFY(close(norm(x), want.detach(), 1e-5));
        }
        // The norm of a sum, read from both inputs without storing it (the block's second norm takes x + a).
        for (const auto& x : {wide.narrow(2, 0, 37), many.narrow(2, 0, 37)}) {
            const auto plus = torch::randn(x.sizes()) * 2;
            const auto sum = x + plus;
            const auto want = sum * torch::rsqrt(sum.pow(2).mean(-1, true) + 1e-5) * norm->weight;
            QVERIFY(close(cpu::rmsNorm(x, norm->weight.detach(), 1e-5, plus), want.detach(), 1e-5));
        }
        QVERIFY_THROWS_EXCEPTION(c10::Error, cpu::rmsNorm(wide.narrow(2, 0, 37), norm->weight.detach(), 1e-5,
                                                          torch::randn({3, 10, 37})));
        // With autograd the module's own backward gives the weight its gradient.
        norm(wide.narrow(2, 0, 37)).sum().backward();
        QVERIFY(norm->weight.grad().defined());
    }

    // Training's RMSNorm gradient (cpu::rmsNormBackward, behind an autograd function) against autograd
    // through the operators in double precision: d 37 (a tail after the blocks of eight), strided rows, one
    // row, and 300 rows on two threads (dw summed in fixed blocks of rows); and through the module.
    void rmsNormGradientMatchesAutograd_data() { test::isaRows(); }
    void rmsNormGradientMatchesAutograd() {
        MODSCOPE_CASE_AT_ISA_ROW();
        torch::manual_seed(5);
        const TwoThreads two;
        const auto w = torch::rand({37}) + 0.5;
        const auto wide = torch::randn({3, 11, 50}) * 3;
        const auto many = torch::randn({2, 150, 50}) * 3;
        for (const auto& x :
             {wide.narrow(2, 0, 37), wide.narrow(2, 0, 37).select(1, 4), many.narrow(2, 0, 37)}) {
            const auto dy = torch::randn(x.sizes().vec());
            const auto xd = x.to(torch::kFloat64).detach().requires_grad_();
            const auto wd = w.to(torch::kFloat64).detach().requires_grad_();
            (xd * torch::rsqrt(xd.pow(2).mean(-1, true) + 1e-5) * wd).backward(dy.to(torch::kFloat64));
            const auto [dx, dw] = cpu::rmsNormBackward(x, w, 1e-5, dy);
            QCOMPARE(dx.sizes().vec(), x.sizes().vec());
            QVERIFY(close(dx.to(torch::kFloat64), xd.grad(), 1e-5));
            QVERIFY(close(dw.to(torch::kFloat64), wd.grad(), 1e-4 * wd.grad().abs().max().item<double>()));
        }
        {
            // dw has the same bits on one thread as on two.
            const auto x = many.narrow(2, 0, 37);
            const auto dy = torch::randn(x.sizes().vec());
            const auto two_threads = cpu::rmsNormBackward(x, w, 1e-5, dy);
            at::set_num_threads(1);
            const auto one_thread = cpu::rmsNormBackward(x, w, 1e-5, dy);
            at::set_num_threads(2);
            QVERIFY(torch::equal(one_thread.second, two_threads.second));
            QVERIFY(torch::equal(one_thread.first, two_threads.first));
        }
        nn::RmsNorm norm(37, 1e-5);
        norm->weight.data().uniform_(0.5, 1.5);
        const auto x = many.narrow(2, 0, 37).detach().requires_grad_();
        const auto dy = torch::randn(x.sizes().vec());
        norm(x).backward(dy);
        const auto fused_x = x.grad().clone(), fused_w = norm->weight.grad().clone();
        x.mutable_grad().reset();
        norm->weight.mutable_grad().reset();
        (x * torch::rsqrt(x.pow(2).mean(-1, true) + 1e-5) * norm->weight).backward(dy);
        QVERIFY(close(fused_x, x.grad(), 1e-5));
        QVERIFY(close(fused_w, norm->weight.grad(), 1e-3));
    }

    void rotaryLoopMatchesTheOperators_data() { test::isaRows(); }
    void rotaryLoopMatchesTheOperators() {
        MODSCOPE_CASE_AT_ISA_ROW();
        torch::manual_seed(5);
        const nn::PositionTables tables(64, 16, 10000.0);
        const auto qkv = torch::randn({2, 9, 3, 2, 16});
        const auto qk = qkv.narrow(2, 0, 2);  // a strided view, as attention passes it
        const auto pos = torch::tensor({3, 4, 5, 9, 10, 11, 40, 41, 63, 0, 1, 2, 3, 4, 5, 6, 7, 8}, torch::kLong).view({2, 9});
        const auto fused = cpu::rotateQK(qk, pos, tables.rope);
        auto grad_in = qk.clone().requires_grad_();
        const auto ops = backend::ops().rotateQK(grad_in, pos, tables.rope);  // the operator backend
        QVERIFY(close(fused, ops.detach(), 1e-6));
        {
            torch::NoGradGuard no_grad;
            QVERIFY(close(backend::cpuKernels()->rotateQK(qk, pos, tables.rope), ops.detach(), 1e-6));
        }
        // Rotation keeps each pair's length (q's scaled by 1/sqrt(hd)), and position 0 does not rotate.
        QVERIFY(close(fused.select(2, 1).norm(2, -1), qk.select(2, 1).norm(2, -1), 1e-5));
        QVERIFY(close(fused[1][0][1], qk[1][0][1], 1e-6));
        QVERIFY(!close(fused[0][0][1], qk[0][0][1], 1e-3));
        QVERIFY_THROWS_EXCEPTION(c10::Error, cpu::rotateQK(qk, torch::full({2, 9}, 64, torch::kLong), tables.rope));

        // 2 x 150 tokens: split over two threads, a row's tokens on both.
        const TwoThreads two;
        const nn::PositionTables longer(512, 16, 10000.0);
        const auto many = torch::randn({2, 150, 3, 2, 16}).narrow(2, 0, 2);
        const auto where = torch::randint(512, {2, 150}, torch::kLong);
        const auto split = cpu::rotateQK(many, where, longer.rope);
        auto many_grad = many.clone().requires_grad_();
        QVERIFY(close(split, backend::ops().rotateQK(many_grad, where, longer.rope).detach(), 1e-6));
    }

    void rowCopiesMatchIndexOperators_data() { test::isaRows(); }
    void rowCopiesMatchIndexOperators() {
        MODSCOPE_CASE_AT_ISA_ROW();
        torch::manual_seed(6);
        const auto wide = torch::randn({40, 30});
        const auto x = wide.narrow(1, 3, 24);  // rows 30 apart
        const auto rows = torch::tensor({39, 0, 7, 8, 21}, torch::kLong);
        QVERIFY(torch::equal(cpu::gatherRows(x, rows), x.index_select(0, rows)));
        QVERIFY_THROWS_EXCEPTION(c10::Error, cpu::gatherRows(x, torch::tensor({40}, torch::kLong)));
        {
            // 600 rows of an embedding-sized table: split over two threads, each fetching ahead in its share.
            const TwoThreads two;
            const auto table = torch::randn({2048, 192});
            const auto ids = torch::randint(2048, {600}, torch::kLong);
            QVERIFY(torch::equal(cpu::gatherRows(table, ids), table.index_select(0, ids)));
        }

        // The gated update added in place: the selected rows get sigmoid(logit) * delta, no other row
        // changes. d 37: the vector loop's tail.
        auto target = torch::randn({40, 37});
        const auto before = target.clone();
        const auto logits = torch::randn({40}) * 3;
        const auto delta = torch::randn({5, 37});
        cpu::addGatedRows(target, rows, logits, delta);
        const auto want =
            before.index_add(0, rows, torch::sigmoid(logits.index_select(0, rows)).unsqueeze(1) * delta);
        QVERIFY(close(target, want, 1e-6));
        const auto untouched = torch::ones({40}, torch::kBool).index_fill(0, rows, false);
        QVERIFY(torch::equal(target.index({untouched}), before.index({untouched})));
        QVERIFY_THROWS_EXCEPTION(c10::Error, cpu::addGatedRows(target, torch::tensor({-1}, torch::kLong),
                                                               logits, delta.narrow(0, 0, 1)));
        QVERIFY_THROWS_EXCEPTION(c10::Error, cpu::addGatedRows(target, rows, logits, delta.narrow(0, 0, 4)));

        // Batched, as a routed layer calls them: x [B, T, d] with each batch row's own positions [B, k], which
        // index into T (a position past T throws even where B * T rows would hold it).
        const auto batch = torch::randn({2, 20, 30}).narrow(2, 2, 24);  // rows 30 apart, batches 600
        const auto idx = torch::tensor({{0, 3, 19}, {2, 3, 11}}, torch::kLong);
        const auto gathered = cpu::gatherRows(batch, idx);
        QCOMPARE(gathered.sizes().vec(), (std::vector<std::int64_t>{2, 3, 24}));
        for (std::int64_t b = 0; b < 2; ++b)
            QVERIFY(torch::equal(gathered[b], batch[b].index_select(0, idx[b])));
        QVERIFY_THROWS_EXCEPTION(c10::Error, cpu::gatherRows(batch, torch::tensor({{0}, {20}}, torch::kLong)));
        QVERIFY_THROWS_EXCEPTION(c10::Error, cpu::gatherRows(batch, idx[0]));  // [k] against [B, T, d]

        auto stream = torch::randn({2, 20, 37});
        const auto stream_before = stream.clone();
        const auto stream_logits = torch::randn({2, 20}) * 3;
        const auto updates = torch::randn({2, 3, 37});
        cpu::addGatedRows(stream, idx, stream_logits, updates);
        for (std::int64_t b = 0; b < 2; ++b) {
            const auto gate = torch::sigmoid(stream_logits[b].index_select(0, idx[b])).unsqueeze(1);
            QVERIFY(close(stream[b], stream_before[b].index_add(0, idx[b], gate * updates[b]), 1e-6));
        }
        QVERIFY_THROWS_EXCEPTION(c10::Error, cpu::addGatedRows(stream, torch::tensor({{0}, {20}}, torch::kLong),
                                                               stream_logits, updates.narrow(1, 0, 1)));
        QVERIFY_THROWS_EXCEPTION(c10::Error, cpu::addGatedRows(stream, idx, stream_logits[0], updates));
    }

    // The router's dot per row against the operator, for strided rows and a length with a tail.
    void rowDotMatchesTheOperator_data() { test::isaRows(); }
    void rowDotMatchesTheOperator() {
        MODSCOPE_CASE_AT_ISA_ROW();
        torch::manual_seed(11);
        const auto w = torch::randn({37});
        const auto wide = torch::randn({2, 9, 50});
        // 300 rows: split over two threads.
        const auto many = torch::randn({300, 50});
        const TwoThreads two;
        for (const auto& x : {wide.narrow(2, 0, 37), wide.narrow(2, 5, 37).contiguous(),
                              wide.narrow(2, 1, 37).select(1, 3), many.narrow(1, 2, 37),
                              many.narrow(1, 2, 37).contiguous()}) {
            const auto got = cpu::rowDot(x, w);
            QCOMPARE(got.sizes().vec(), x.sizes().slice(0, x.dim() - 1).vec());
            QVERIFY(close(got, torch::matmul(x, w), 1e-5));
            // The router's weight as the module holds it, [1, d].
            QVERIFY(torch::equal(cpu::rowDot(x, w.view({1, 37})), got));
        }
        QVERIFY_THROWS_EXCEPTION(c10::Error, cpu::rowDot(wide, w));
        QVERIFY_THROWS_EXCEPTION(c10::Error, cpu::rowDot(many.narrow(1, 2, 37), torch::randn({74}).slice(0, 0, 74, 2)));
    }

    // The predictor's fused forward against the module's operators, for a batch of rows and for none; the
    // module takes it without autograd.
    void predictorLogitsMatchTheOperators_data() { test::isaRows(); }
    void predictorLogitsMatchTheOperators() {
        MODSCOPE_CASE_AT_ISA_ROW();
        torch::manual_seed(12);
        nn::Predictor predictor(40, 24);
        predictor->fc1->bias.data().uniform_(-1, 1);
        predictor->fc2->bias.data().fill_(0.3);
        const auto x = torch::randn({3, 17, 40});
        const auto &w1 = predictor->fc1->weight, &b1 = predictor->fc1->bias;
        const auto &w2 = predictor->fc2->weight, &b2 = predictor->fc2->bias;
        const auto want = (torch::silu(x.matmul(w1.t()) + b1).matmul(w2.view(-1)) + b2).detach();
        const auto w1_t = w1.t().contiguous();
        const auto rows = x.view({-1, 40});
        QVERIFY(close(cpu::predictorLogits(rows, w1_t, b1, w2, b2).view({3, 17}), want, 1e-5));
        QCOMPARE(cpu::predictorLogits(rows.narrow(0, 0, 0), w1_t, b1, w2, b2).numel(), 0);
        torch::InferenceMode guard;
        QVERIFY(close(predictor(x), want, 1e-5));
    }

    // Causal mode reads the predictor for the prefix top-k's candidates only, where a trace reads it for
    // every token: a row's logit must be the same bits either way, whichever rows share its pass or its
    // thread, and in the AVX2 and AVX-512 builds (the baseline build's, without FMA, are its own). Widths 64
    // (the bundled model's), 77 (blocks of 32, then 8, then a scalar tail; 64 then a scalar tail wide) and 93
    // (a block of 16 wide), against double precision, for rows picked out of a strided x.
    void predictorLogitsAtRowsAreTheRowsOwn_data() { test::isaRows(); }
    void predictorLogitsAtRowsAreTheRowsOwn() {
        MODSCOPE_CASE_AT_ISA_ROW();
        torch::manual_seed(13);
        const TwoThreads two;
        for (const std::int64_t h : {64, 77, 93}) {
            const std::int64_t d = 192, N = 300;
            const auto x = torch::randn({N, d + 8}).narrow(1, 4, d);  // rows d + 8 apart
            const auto w1_t = torch::randn({d, h}) * 0.1, b1 = torch::randn({h}), w2 = torch::randn({h});
            const auto b2 = torch::full({1}, 0.3);
            const auto xd = x.to(torch::kDouble);
            const auto want = torch::silu(xd.matmul(w1_t.to(torch::kDouble)) + b1.to(torch::kDouble))
                                  .matmul(w2.to(torch::kDouble)) +
                              b2.to(torch::kDouble);
            const auto all = cpu::predictorLogits(x, w1_t, b1, w2, b2);
            QVERIFY(close(all.to(torch::kDouble), want, 1e-4));
            const auto picked = torch::tensor({299, 3, 4, 150, 151, 0, 17}, torch::kLong);
            QVERIFY(
                torch::equal(cpu::predictorLogits(x, w1_t, b1, w2, b2, picked), all.index_select(0, picked)));
            for (const std::int64_t i : {0, 1, 150, 299})
                QVERIFY(
                    torch::equal(cpu::predictorLogits(x, w1_t, b1, w2, b2, torch::tensor({i}, torch::kLong)),
                                 all.narrow(0, i, 1)));
            const auto evens = torch::arange(0, N, 2, torch::kLong);  // 150 rows, split over both threads
            QVERIFY(
                torch::equal(cpu::predictorLogits(x, w1_t, b1, w2, b2, evens), all.index_select(0, evens)));
            if (isa != cpu::Isa::Avx512) continue;
            torch::Tensor narrow, narrow_picked;
            {
                const cpu::ScopedIsaCap avx2(cpu::Isa::Avx2);
                QCOMPARE(QString(cpu::isaName(cpu::isaLevel())), QString("avx2"));
                narrow = cpu::predictorLogits(x, w1_t, b1, w2, b2);
                narrow_picked = cpu::predictorLogits(x, w1_t, b1, w2, b2, picked);
            }
            QVERIFY2(torch::equal(narrow, all), qPrintable(QString("h %1: AVX2 and AVX-512 builds differ").arg(h)));
            QVERIFY(torch::equal(narrow_picked, all.index_select(0, picked)));
        }
        const auto x = torch::randn({5, 8});
        QVERIFY_THROWS_EXCEPTION(
            c10::Error, cpu::predictorLogits(x, torch::randn({8, 4}), torch::randn({4}), torch::randn({4}),
                                             torch::randn({1}), torch::tensor({5}, torch::kLong)));
    }

    // Causal mode runs the predictor on each candidate as the router's walk finds it, on the team's other
    // thread, and on both once the walk is done (cpu::predictorLogitsFed). Every row's logit must be
    // predictorLogits' bits whatever the pace of the producer: rows pushed one by one with a pause between
    // them (so the other thread waits for a full pass and takes it), all at once, and a number of rows that
    // leaves a partial pass; with a feed too small to split, with none, and when the producer throws part-way
    // (the rows it pushed are done, then its exception comes out); in each build.
    void predictorLogitsFedAreTheRowsOwn_data() { test::isaRows(); }
    void predictorLogitsFedAreTheRowsOwn() {
        MODSCOPE_CASE_AT_ISA_ROW();
        torch::manual_seed(14);
        const TwoThreads two;
        const std::int64_t d = 192, h = 64, N = 700;
        const auto x = torch::randn({N, d});
        const auto w1_t = torch::randn({d, h}) * 0.1, b1 = torch::randn({h}), w2 = torch::randn({h});
        const auto b2 = torch::full({1}, -0.2);
        const cpu::PredictorParams params{w1_t.data_ptr<float>(), b1.data_ptr<float>(), w2.data_ptr<float>(),
                                          -0.2f, d, h};
        const auto pause = [](int us) {
            const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
            while (std::chrono::steady_clock::now() < until) {
            }
        };
        // rows pushed in the order given, with `gap_us` between them, into a feed with room for `room`.
        const auto fed = [&](const std::vector<std::int64_t>& rows, std::int64_t room, int gap_us) {
            cpu::RowFeed feed(room);
            std::vector<float> logits(static_cast<std::size_t>(room), std::nanf(""));
            cpu::predictorLogitsFed(params, x.data_ptr<float>(), d, feed,
                                    [&] {
                                        for (const auto r : rows) {
                                            feed.push(r);
                                            if (gap_us > 0) pause(gap_us);
                                        }
                                    },
                                    logits.data());
            if (feed.size() != static_cast<std::int64_t>(rows.size())) return false;
            if (!std::equal(rows.begin(), rows.end(), feed.rows())) return false;
            const auto idx = torch::tensor(rows, torch::kLong);
            const auto want = cpu::predictorLogits(x, w1_t, b1, w2, b2, idx);
            const auto got = torch::from_blob(logits.data(), {static_cast<std::int64_t>(rows.size())});
            return bool(torch::equal(got, want));
        };
        std::vector<std::int64_t> scattered;  // 87 rows (21 passes of four and one row), not in order
        for (std::int64_t i = 0; i < 87; ++i) scattered.push_back((i * 263) % N);
        QVERIFY(fed(scattered, 512, 2));
        QVERIFY(fed(scattered, 512, 0));
        QVERIFY(fed(scattered, 87, 1));  // too small a feed to split: one thread
        QVERIFY(fed({5}, 512, 0));
        QVERIFY(fed({}, 512, 0));
        // More rows than the room made for them: the push refuses, and the error comes out.
        QVERIFY_THROWS_EXCEPTION(c10::Error, fed({1, 2, 3}, 2, 0));
        cpu::RowFeed feed(512);
        std::vector<float> logits(512, std::nanf(""));
        bool thrown = false;
        try {
            cpu::predictorLogitsFed(params, x.data_ptr<float>(), d, feed,
                                    [&] {
                                        for (std::int64_t r = 0; r < 10; ++r) feed.push(3 * r);
                                        throw std::runtime_error("walk failed");
                                    },
                                    logits.data());
        } catch (const std::runtime_error& e) {
            thrown = std::string(e.what()) == "walk failed";
        }
        QVERIFY(thrown);
        QCOMPARE(feed.size(), std::int64_t(10));
        const auto want = cpu::predictorLogits(x, w1_t, b1, w2, b2, torch::arange(0, 30, 3, torch::kLong));
        QVERIFY(torch::equal(torch::from_blob(logits.data(), {10}), want));
    }

    // SwiGLU's fused activation against silu(gate) * up: strided rows, a width with a tail after the blocks
    // of eight, 300 rows on two threads, and the ends of exp's range (where it is clamped), zero and NaN.
    void swiGluMatchesTheOperators_data() { test::isaRows(); }
    void swiGluMatchesTheOperators() {
        MODSCOPE_CASE_AT_ISA_ROW();
        torch::manual_seed(13);
        const auto wide = torch::randn({3, 7, 90}) * 4;
        const auto many = torch::randn({300, 74}) * 4;
        auto edges = torch::tensor({0.0f, -0.0f, 30.0f, -30.0f, 87.5f, -87.5f, 89.0f, -89.0f, 100.0f, -100.0f,
                                    1e-20f, -3e38f, 3e38f, 1.0f, 2.0f, -1.0f});
        edges = torch::cat({edges, torch::full({16}, 1.5f)});  // gate | up, 16 each
        const TwoThreads two;
        for (const auto& gu :
             {wide.narrow(2, 3, 74), many, wide.narrow(2, 0, 74).select(1, 2), edges.view({1, 32})}) {
            const auto halves = gu.chunk(2, -1);
            const auto want = torch::silu(halves[0]) * halves[1];
            const auto got = cpu::swiGlu(gu);
            QVERIFY(got.is_contiguous());
            QCOMPARE(got.sizes().vec(), want.sizes().vec());
            // Within a few float ulps where the result is normal, and both zero (or tiny) where it is not.
            QVERIFY2(torch::allclose(got, want, 1e-6, 1e-30),
                     qPrintable(QString::number((got - want).abs().max().item<float>())));
        }
        // Across exp's normal range, against double precision: within 3e-7 relative (2.5 float ulp; the
        // polynomial's coefficients matter at 1e-6).
        {
            const auto gate = torch::linspace(-87.0, 88.0, 100 * 1000).view({100, 1000});
            const auto got = cpu::swiGlu(torch::cat({gate, torch::ones_like(gate)}, 1));
            const auto exact = gate.to(torch::kFloat64);
            const auto want = exact / (1 + torch::exp(-exact));
            const double worst =
                ((got.to(torch::kFloat64) - want).abs() / want.abs().clamp_min(1e-30)).max().item<double>();
            QVERIFY2(worst < 3e-7, qPrintable(QString::number(worst)));
        }
        auto nan_gate = torch::zeros({1, 16});
        nan_gate[0][2] = NAN;
        QVERIFY(std::isnan(cpu::swiGlu(nan_gate)[0][2].item<float>()));
        QVERIFY_THROWS_EXCEPTION(c10::Error, cpu::swiGlu(torch::randn({2, 7})));
        // The module takes it without autograd too, and its own gradient with.
        nn::SwiGlu mlp(24, 40);
        const auto x = torch::randn({2, 5, 24});
        const auto grad_path = mlp(x);
        torch::InferenceMode guard;
        QVERIFY(close(mlp(x), grad_path.detach(), 1e-5));
    }

    // Training's SwiGLU gradient (cpu::swiGluBackward, behind an autograd function) against autograd through
    // silu and the product in double precision: strided rows, a width with a tail after the blocks of eight,
    // 300 rows on two threads; and the module's parameter and input gradients against the operators'.
    void swiGluGradientMatchesAutograd_data() { test::isaRows(); }
    void swiGluGradientMatchesAutograd() {
        MODSCOPE_CASE_AT_ISA_ROW();
        torch::manual_seed(14);
        const TwoThreads two;
        const auto wide = torch::randn({3, 7, 90}) * 4;
        for (const auto& gu : {wide.narrow(2, 3, 74), torch::randn({300, 74}) * 4}) {
            const auto dy = torch::randn(gu.sizes().vec()).narrow(-1, 0, 37);
            const auto exact = gu.to(torch::kFloat64).detach().requires_grad_();
            const auto halves = exact.chunk(2, -1);
            (torch::silu(halves[0]) * halves[1]).backward(dy.to(torch::kFloat64));
            const auto got = cpu::swiGluBackward(gu, dy);
            QVERIFY(got.is_contiguous());
            QCOMPARE(got.sizes().vec(), gu.sizes().vec());
            const double worst = (got.to(torch::kFloat64) - exact.grad()).abs().max().item<double>();
            const double scale = exact.grad().abs().max().item<double>();
            QVERIFY2(worst < 1e-6 * scale, qPrintable(QString::number(worst / scale)));
        }
        nn::SwiGlu mlp(24, 40);
        const auto x = torch::randn({2, 5, 24}).requires_grad_();
        const auto dy = torch::randn({2, 5, 24});
        mlp(x).backward(dy);
        const auto fused_x = x.grad().clone(), fused_w = mlp->gate_up->weight.grad().clone();
        x.mutable_grad().reset();
        mlp->gate_up->weight.mutable_grad().reset();
        const auto gu = torch::nn::functional::linear(x, mlp->gate_up->weight).chunk(2, -1);
        torch::nn::functional::linear(torch::silu(gu[0]) * gu[1], mlp->down->weight).backward(dy);
        QVERIFY(close(fused_x, x.grad(), 1e-5));
        QVERIFY(close(fused_w, mlp->gate_up->weight.grad(), 1e-5));
    }

    // Causal softmax in place against the masked operators: rows in a strided batch, a block after cached
    // keys (first > 0), rows shorter than a vector and with tails, a score that overflows exp unless the
    // row's max is taken from the tail too, and 3 x 128 rows on two threads.
    void causalSoftmaxMatchesTheOperators_data() { test::isaRows(); }
    void causalSoftmaxMatchesTheOperators() {
        MODSCOPE_CASE_AT_ISA_ROW();
        torch::manual_seed(21);
        const TwoThreads two;
        // Queries, keys, the first query's own key.
        const std::vector<std::array<int, 3>> shapes{
            {5, 5, 0}, {13, 30, 17}, {128, 128, 0}, {64, 300, 236}, {1, 9, 8}};
        for (const auto& [n, keys, first] : shapes) {
            const auto wide = torch::randn({3, n, keys + 6}) * 8;
            // The last query's last visible key, far above the rest.
            wide[0][n - 1][2 + std::min(keys, first + n) - 1] = 500.f;
            auto scores = wide.narrow(2, 2, keys);  // rows keys + 6 apart
            const auto before = scores.clone();
            const auto pads = torch::cat({wide.narrow(2, 0, 2), wide.narrow(2, keys + 2, 4)}, 2);
            const auto key = torch::arange(keys).view({1, 1, keys});
            const auto query = (torch::arange(n) + first).view({1, n, 1});
            const auto ninf = torch::full({}, -std::numeric_limits<float>::infinity());
            const auto want = torch::softmax(torch::where(key <= query, before, ninf), -1);
            cpu::causalSoftmax(scores, first);
            QVERIFY2(torch::allclose(scores, want, 1e-6, 1e-6),
                     qPrintable(QString("n %1 keys %2 first %3: %4")
                                    .arg(n)
                                    .arg(keys)
                                    .arg(first)
                                    .arg((scores - want).abs().max().item<float>())));
            const auto later = (key > query).expand({3, n, keys});
            QVERIFY(scores.masked_select(later).eq(0).all().item<bool>());  // exactly 0, not tiny
            QVERIFY(torch::equal(torch::cat({wide.narrow(2, 0, 2), wide.narrow(2, keys + 2, 4)}, 2), pads));
        }
    }

    // Small attention against softmax(q k^T + causal mask) v, in each build on two threads: row by row (the AVX2
    // and baseline builds, and heads whose size is not a multiple of 16) and a few rows at a time in AVX-512
    // (four up to 64 keys in all, two up to 128). Heads read through strided views as the forward passes them,
    // keys cached before the queries, head sizes with no tail (64: the register path of the row loop), one past
    // it (72), one with a tail in the dot products (36), 48 and 128 (three and eight value vectors a row),
    // partial groups of rows and partial blocks of 16 keys, 65 to 128 keys (two rows a group, up to eight
    // blocks), 129 (row by row again), and scores large enough that the softmax needs its max subtracted.
    void smallAttentionMatchesTheOperators_data() { test::isaRows(); }
    void smallAttentionMatchesTheOperators() {
        MODSCOPE_CASE_AT_ISA_ROW();
        TwoThreads two;
        const bool wide = isa == cpu::Isa::Avx512;  // the AVX-512 attention takes the rows that fit it
        torch::manual_seed(14);
        for (const auto hd : {64, 72, 36, 48, 128}) {
            for (const auto& [S, prior] :
                 {std::pair<int, int>{1, 0}, {1, 40}, {9, 0}, {16, 0}, {32, 0}, {5, 23}, {17, 0}, {33, 0},
                  {61, 0}, {64, 0}, {30, 34}, {2, 62}, {65, 0}, {97, 0}, {128, 0}, {60, 68}, {3, 125},
                  {129, 0}}) {
                QCOMPARE(cpu::wideAttentionFits(S, prior, hd), wide && S > 1 && prior + S <= 128 && hd % 16 == 0);
                const int H = 3;
                // Scores of the same size at 128 as at 72: their rounding grows with them.
                const double scale = 2.0 * std::min(1.0, std::sqrt(72.0 / hd));
                const auto qkv = torch::randn({1, S, 3, H, hd}) * scale;
                const auto q = qkv.select(2, 0).transpose(1, 2).reshape({H, S, hd});
                const auto k = torch::cat(
                    {torch::randn({H, prior, hd}) * scale, qkv.select(2, 1).transpose(1, 2).reshape({H, S, hd})}, 1);
                const auto v = torch::cat(
                    {torch::randn({H, prior, hd}), qkv.select(2, 2).transpose(1, 2).reshape({H, S, hd})}, 1);
                const auto later = torch::arange(prior + S).unsqueeze(0) > (torch::arange(S) + prior).unsqueeze(1);
                const auto scores = torch::bmm(q.to(torch::kFloat64), k.transpose(1, 2).to(torch::kFloat64))
                                        .masked_fill(later, -INFINITY);
                const auto want =
                    torch::bmm(torch::softmax(scores, -1), v.to(torch::kFloat64)).to(torch::kFloat32);
                auto merged = torch::empty({S, H, hd});
                auto out = merged.transpose(0, 1);  // heads side by side in each row, as the projection reads them
                cpu::smallCausalAttention(q, k, v, prior, out);
                // Scores reach tens here: a float dot product's rounding, about 1e-7 of it, moves the weights
                // by some 1e-5. Letting one later key in moves some outputs by whole units.
                QVERIFY2(close(out, want, 5e-5),
                         qPrintable(QString("%1: hd %2, %3 queries after %4: %5")
                                        .arg(cpu::isaName(isa))
                                        .arg(hd)
                                        .arg(S)
                                        .arg(prior)
                                        .arg((out - want).abs().max().item<float>())));
            }
        }
        // The probabilities themselves, to float rounding: with quarter-integer q and k every score is exact,
        // and with the values an identity each output row is its query's probabilities.
        for (const auto& [S, prior] : {std::pair<int, int>{16, 0}, {64, 0}, {7, 50}, {128, 0}, {9, 90}}) {
            const int H = 2, keys = prior + S, hd = keys > 64 ? 128 : 64;  // each key a column of the identity
            const auto q = torch::randint(-4, 5, {H, S, hd}) * 0.25;
            const auto k = torch::randint(-4, 5, {H, keys, hd}) * 0.25;
            const auto v = torch::eye(keys, hd).expand({H, keys, hd}).contiguous();
            auto out = torch::empty({H, S, hd});
            cpu::smallCausalAttention(q, k, v, prior, out);
            const auto later = torch::arange(keys).unsqueeze(0) > (torch::arange(S) + prior).unsqueeze(1);
            const auto want = torch::softmax(
                torch::bmm(q.to(torch::kFloat64), k.transpose(1, 2).to(torch::kFloat64)).masked_fill(later, -INFINITY),
                -1);
            const auto got = out.narrow(2, 0, keys).to(torch::kFloat64);
            QVERIFY2(torch::allclose(got, want, 1e-6, 1e-12),
                     qPrintable(QString("%1: %2 queries after %3: relative error %4")
                                    .arg(cpu::isaName(isa))
                                    .arg(S)
                                    .arg(prior)
                                    .arg(((got - want).abs() / want.clamp_min(1e-30)).max().item<double>())));
        }

        const auto q = torch::randn({2, 4, 16});
        auto out = torch::empty({2, 4, 16});
        QVERIFY_THROWS_EXCEPTION(c10::Error, cpu::smallCausalAttention(q, torch::randn({2, 5, 16}),
                                                                       torch::randn({2, 5, 16}), 0, out));
    }

    // The CPU top-k against torch::topk: the same set for distinct values; ties go to the earlier position and
    // NaN counts above everything, as torch::topk orders them.
    void topkSelectionMatchesTorch() {
        torch::manual_seed(7);
        for (const int T : {1, 8, 100, 512}) {
            const auto r = torch::randn({3, T});
            for (const int k : {0, 1, std::max(1, T / 8), T}) {
                const auto want = std::get<0>(std::get<1>(r.topk(k, 1, true, false)).sort(1));
                QVERIFY2(torch::equal(nn::topkIndices(r, k), want), qPrintable(QString("T %1 k %2").arg(T).arg(k)));
            }
        }
        const auto ties = torch::tensor({1.f, 3.f, 2.f, 3.f, 3.f, NAN, 0.f}).unsqueeze(0);
        QVERIFY(torch::equal(nn::topkIndices(ties, 3), torch::tensor({1, 3, 5}, torch::kLong).unsqueeze(0)));
        // -0 and 0 are equal (the earlier first); NaNs, infinities and runs of equal values against a stable
        // sort by value, NaN highest.
        const auto zeros = torch::tensor({-1.f, 0.f, -0.f, 0.f}).unsqueeze(0);
        QVERIFY(torch::equal(nn::topkIndices(zeros, 2), torch::tensor({1, 2}, torch::kLong).unsqueeze(0)));
        auto coarse = torch::randint(0, 4, {2, 512}).to(torch::kFloat32);
        coarse.index_put_({0, 7}, NAN);
        coarse.index_put_({0, 400}, NAN);
        coarse.index_put_({1, 9}, INFINITY);
        coarse.index_put_({1, 10}, -INFINITY);
        for (const int k : {1, 2, 3, 64, 300, 511}) {
            const auto got = nn::topkIndices(coarse, k);
            for (std::int64_t b = 0; b < 2; ++b) {
                std::vector<std::int64_t> order(512);
                std::iota(order.begin(), order.end(), 0);
                const float* v = coarse[b].data_ptr<float>();
                const auto rank = [](float x) { return std::isnan(x) ? INFINITY : x; };
                std::stable_sort(order.begin(), order.end(), [&](std::int64_t i, std::int64_t j) {
                    return (std::isnan(v[i]) && !std::isnan(v[j])) || rank(v[i]) > rank(v[j]);
                });
                std::vector<std::int64_t> want(order.begin(), order.begin() + k);
                std::sort(want.begin(), want.end());
                QVERIFY2(torch::equal(got[b], torch::tensor(want, torch::kLong)),
                         qPrintable(QString("coarse row %1 k %2").arg(b).arg(k)));
            }
        }
    }

    // The choice from two readings: other processes' share of the machine is its busy time minus ours.
    void threadsFollowOtherProcessesLoad() {
        const cpu::CpuTimes t0{100.0, 50.0, 10.0};
        QCOMPARE(cpu::threadsFromLoad(t0, {101.0, 50.2, 10.0}, 2), 2);  // others 0.2 cores
        QCOMPARE(cpu::threadsFromLoad(t0, {101.0, 51.5, 10.0}, 2), 1);  // others 1.5 cores
        QCOMPARE(cpu::threadsFromLoad(t0, {101.0, 52.0, 12.0}, 2), 2);  // both cores busy, all of it ours
        QCOMPARE(cpu::threadsFromLoad(t0, {101.0, 51.0, 10.4}, 4), 3);  // others 0.6 cores of 4
        QCOMPARE(cpu::threadsFromLoad(t0, {101.0, 53.0, 10.4}, 4), 1);  // others 2.6 cores of 4
        QCOMPARE(cpu::threadsFromLoad(t0, {101.0, 50.0, 10.0}, 16), 16);
        QCOMPARE(cpu::threadsFromLoad(t0, {100.05, 51.0, 10.0}, 2), 0);  // too short to tell
        const auto now = cpu::readCpuTimes();
        QVERIFY(now.machine_busy > 0 && now.own_busy > 0 && now.machine_busy >= now.own_busy);
    }

    // Two processes spinning on every core: the next CPU work gets one thread, so no barrier of ours waits
    // for a preempted thread. LibTorch's count is put back after; the engine's choice stays at one thread until
    // its next reading, which no later test here takes.
    void busyMachineGetsOneThread() {
        if (qEnvironmentVariableIsSet("MODSCOPE_TORCH_THREADS")) QSKIP("thread count overridden");
        const int cores = cpu::allCores();
        cpu::adaptThreads();  // first reading
        std::vector<pid_t> children;
        for (int i = 0; i < cores; ++i) {
            const pid_t pid = fork();
            if (pid == 0) {
                volatile unsigned long spin = 0;
                for (;;) ++spin;
            }
            QVERIFY(pid > 0);
            children.push_back(pid);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(600));
        const int chosen = cpu::adaptThreads();
        const int torch_threads = at::get_num_threads();
        for (const pid_t pid : children) {
            kill(pid, SIGKILL);
            waitpid(pid, nullptr, 0);
        }
        QCOMPARE(chosen, 1);
        QCOMPARE(torch_threads, 1);
        at::set_num_threads(cores);
    }

    // Signal handlers never run on a thread that runs the products, nor on the OpenMP threads working for it,
    // where oneDNN's sgemm would have the handler's frame written into the heap (cpu_signals.h). The computing
    // thread starts as an app's worker does, signals unblocked, and runs a parallel region of its own (starting
    // its OpenMP threads) before its first product. Then it multiplies while another thread sends SIGUSR1 every
    // 0.2 ms to the process and to each computing thread by id (as a profiler's timer does), until 200 signals
    // were handled and 100 products ran after the first signal: counts, not a time window, so a slow or busy
    // machine only takes longer. Once with a team of two threads and once alone.
    void signalHandlersStayOffComputeThreads() {
        static std::atomic<int> handled{0};
        static std::array<std::atomic<pid_t>, 1 << 15> ran_on{};
        struct sigaction action {};
        action.sa_handler = [](int) {
            const int i = handled.fetch_add(1);
            if (i < int(ran_on.size())) ran_on[i] = gettid();
        };
        action.sa_flags = SA_RESTART;
        sigemptyset(&action.sa_mask);
        QVERIFY(sigaction(SIGUSR1, &action, nullptr) == 0);
        const int threads_before = at::get_num_threads();
        torch::manual_seed(3);
        const auto a = torch::randn({128, 192}), b = torch::randn({192, 512});
        const auto pa = torch::randn({8, 64, 32}), pb = torch::randn({8, 32, 64});
        const auto want = exact(a, b), pwant = exact(pa, pb);
        constexpr int kHandled = 200, kProductsUnderSignals = 100;

        for (const int team : {2, 1}) {
            handled = 0;
            std::mutex mutex;
            std::set<pid_t> compute;
            std::atomic<bool> multiplying{false}, enough{false};
            std::atomic<int> products{0}, products_at_first_signal{-1};
            int wrong = 0;
            std::thread worker([&] {
                sigset_t none;
                sigemptyset(&none);
                pthread_sigmask(SIG_SETMASK, &none, nullptr);
                at::set_num_threads(team);
                const auto noteThreads = [&] {
#pragma omp parallel num_threads(team)
                    {
                        std::lock_guard<std::mutex> lock(mutex);
                        compute.insert(gettid());
                    }
                };
                noteThreads();
                while (!enough) {
                    wrong += !close(cpu::mm(a, b), want) + !close(cpu::bmm(pa, pb), pwant);
                    products += 2;
                    multiplying = true;
                }
                noteThreads();
            });
            std::thread sender([&] {
                while (!multiplying) std::this_thread::sleep_for(std::chrono::microseconds(100));
                std::vector<pid_t> targets;
                {
                    std::lock_guard<std::mutex> lock(mutex);
                    targets.assign(compute.begin(), compute.end());
                }
                products_at_first_signal = products.load();
                // A guard against a hang, not a speed bound: signals that are never handled fail the test.
                const auto give_up = std::chrono::steady_clock::now() + std::chrono::minutes(5);
                while (handled < kHandled || products - products_at_first_signal < kProductsUnderSignals) {
                    if (std::chrono::steady_clock::now() > give_up) break;
                    kill(getpid(), SIGUSR1);
                    for (const pid_t tid : targets) tgkill(getpid(), tid, SIGUSR1);
                    std::this_thread::sleep_for(std::chrono::microseconds(200));
                }
                enough = true;
            });
            worker.join();
            sender.join();

            QCOMPARE(wrong, 0);
            QVERIFY(products - products_at_first_signal >= kProductsUnderSignals);
            QCOMPARE(int(compute.size()), team);
            const int n = std::min<int>(handled, int(ran_on.size()));
            QVERIFY(n >= kHandled);
            int on_compute = 0;
            for (int i = 0; i < n; ++i) on_compute += compute.count(ran_on[i]) > 0;
            QVERIFY2(on_compute == 0, qPrintable(QString("team of %1: %2 of %3 signals handled on a computing thread")
                                                     .arg(team).arg(on_compute).arg(n)));
        }
        at::set_num_threads(threads_before);
    }

    // The model's forward, which now runs on these products, still matches a forward through torch's own.
    void modelForwardMatchesTorchProducts_data() { test::isaRows(); }
    void modelForwardMatchesTorchProducts() {
        MODSCOPE_CASE_AT_ISA_ROW();
        auto model = Model::create(test::tinyConfig(), 5, "cpu");
        auto& net = *internals(*model).net;
        const auto ids = test::idsTensor(test::randomIds(150, 300, 9));
        torch::NoGradGuard no_grad;
        nn::ForwardOptions opt;
        opt.capacity = 0.25;
        const auto ours = net.logits(net.hidden(ids, opt));
        // Dense twin path: every token, plain torch ops, capacity 1 (checked against the routed forward in
        // engine_routing_test); here the same weights at capacity 1 through both paths.
        opt.capacity = 1.0;
        const auto full = net.logits(net.hidden(ids, opt));
        const auto pos = torch::arange(150, torch::kLong).unsqueeze(0);
        auto x = net.tok_emb(ids);
        for (auto& block : net.blocks) {
            const auto h = block->attn_norm(x);
            const auto qkv = torch::nn::functional::linear(h, block->attn->qkv->weight).view({1, 150, 3, 2, 16});
            const auto qk = backend::ops().rotateQK(qkv.narrow(2, 0, 2), pos, net.positions.rope);
            const auto q = qk.select(2, 0).transpose(1, 2).reshape({2, 150, 16});
            const auto k = qk.select(2, 1).transpose(1, 2).reshape({2, 150, 16});
            const auto v = qkv.select(2, 2).transpose(1, 2).reshape({2, 150, 16});
            const auto mask = torch::ones({150, 150}, torch::kBool).triu(1);
            const auto scores = torch::bmm(q, k.transpose(1, 2)).masked_fill(mask, -INFINITY);
            const auto att = torch::bmm(torch::softmax(scores, -1), v).view({1, 2, 150, 16}).transpose(1, 2).reshape({1, 150, 32});
            const auto a = torch::nn::functional::linear(att, block->attn->proj->weight);
            const auto gu = torch::nn::functional::linear(block->mlp_norm(x + a), block->mlp->gate_up->weight).chunk(2, -1);
            const auto m = torch::nn::functional::linear(torch::silu(gu[0]) * gu[1], block->mlp->down->weight);
            x = block->routed ? x + torch::sigmoid(block->routerLogits(x)).unsqueeze(-1) * (a + m) : x + a + m;
        }
        const auto want = torch::nn::functional::linear(net.norm_f(x), net.tok_emb->weight);
        QVERIFY(torch::allclose(full, want, 1e-4, 1e-4));
        QVERIFY(!torch::allclose(ours, want, 1e-4, 1e-4));  // capacity 0.25 routes: a different forward
    }

    // A block on a routed layer's few tokens (cpu::smallBlockDelta, one reused buffer) gives the bits of the
    // operator-level path it replaces: attention, the norm of x + a, the MLP, each a tensor. At the default
    // shape (d 192, 3 heads of 64), tokens at scattered positions as a routed layer gathers them, in each
    // build: below AVX-512 only up to 32 tokens take it.
    void smallBlockEqualsTheOperatorPath_data() { test::isaRows(); }
    void smallBlockEqualsTheOperatorPath() {
        MODSCOPE_CASE_AT_ISA_ROW();
        ModelConfig config;
        config.max_seq_len = 512;
        auto model = Model::create(config, 17, "cpu");
        auto& net = *internals(*model).net;
        auto& block = *net.blocks[1];
        torch::InferenceMode guard;
        torch::manual_seed(18);
        for (const int S : {1, 5, 16, 32, 33, 64, 65, 128}) {
            // Beyond 64 tokens the operator-level block takes them, the wide attention inside it.
            const bool fits = cpu::smallBlockFits(S, block.attn->head_dim);
            QCOMPARE(fits, S <= 32 || (S <= 64 && isa == cpu::Isa::Avx512));
            if (!fits) continue;
            const auto x = torch::randn({1, S, config.d_model});
            const auto pos = std::get<0>(torch::randperm(512, torch::kLong).narrow(0, 0, S).sort()).unsqueeze(0);
            const auto got = block.delta(x, pos, net.positions);
            const auto a = block.attn(block.attn_norm(x), pos, net.positions);
            const auto want = block.mlp(cpu::rmsNorm(x, block.mlp_norm->weight, block.mlp_norm->eps, a)).add_(a);
            QVERIFY2(torch::equal(got, want), qPrintable(QString("%1 tokens: max difference %2")
                                                             .arg(S)
                                                             .arg((got - want).abs().max().item<float>())));
        }
    }

    // A full layer in one parallel region (cpu::addBlockInPlace, each thread on its own rows) gives the bits
    // of x + delta(x) through the path it replaces (smallBlockDelta up to 64 tokens, the operator-level block
    // beyond), on two threads and on one, at the sequence's own positions and at scattered ones. It takes a
    // layer only at AVX-512 (its attention's); below, the rows check that it never does.
    void teamBlockEqualsTheOperatorPath_data() { test::isaRows(); }
    void teamBlockEqualsTheOperatorPath() {
        MODSCOPE_CASE_AT_ISA_ROW();
        ModelConfig config;
        config.max_seq_len = 512;
        auto model = Model::create(config, 19, "cpu");
        auto& net = *internals(*model).net;
        auto& block = *net.blocks[0];
        const auto hd = block.attn->head_dim;
        torch::InferenceMode guard;
        torch::manual_seed(20);
        for (const int S : {1, 4, 7, 8, 12, 33, 64, 65, 100, 128, 129}) {
            const bool fits = cpu::teamBlockFits(S, hd);
            QCOMPARE(fits, S >= 8 && S <= 128 && isa == cpu::Isa::Avx512);
            if (!fits) continue;
            const auto x = torch::randn({1, S, config.d_model});
            const auto own = torch::arange(S, torch::kLong).unsqueeze(0);
            const auto scattered =
                std::get<0>(torch::randperm(512, torch::kLong).narrow(0, 0, S).sort()).unsqueeze(0);
            for (const auto& pos : {own, scattered}) {
                const auto a = block.attn(block.attn_norm(x), pos, net.positions);
                const auto m =
                    block.mlp(cpu::rmsNorm(x, block.mlp_norm->weight, block.mlp_norm->eps, a)).add_(a);
                const auto want = x + m;
                QVERIFY(torch::equal(want, x + block.delta(x, pos, net.positions)));
                for (const int threads : {2, 1}) {
                    const int before = at::get_num_threads();
                    at::set_num_threads(threads);
                    auto got = x.clone();
                    block.addDeltaInPlace(got, pos, net.positions);
                    at::set_num_threads(before);
                    QVERIFY2(torch::equal(got, want),
                             qPrintable(QString("%1 tokens, %2 thread(s): max difference %3")
                                            .arg(S)
                                            .arg(threads)
                                            .arg((got - want).abs().max().item<float>())));
                }
            }
        }
    }
};

MODSCOPE_ENGINE_TEST_MAIN(EngineCpuPathsTest)
#include "engine_cpu_paths_test.moc"
