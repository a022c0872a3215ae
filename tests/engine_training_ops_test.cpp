// Training's fused operations (cpu_training.h) against LibTorch's operators in double precision: causal
// self-attention with rotary positions, values and gradients, across query blocks and on one thread or two;
// the head split as the adjoint of its backward; the causal softmax's gradient; the cross-entropy loss; and
// the attention module and the trainer's loss taking them. Each at every instruction-set level this CPU has
// (isa_levels.h).
#include <ATen/Parallel.h>
#include <torch/nn/functional/loss.h>

#include <QTest>

#include "nn/attention_blocks.h"
#include "cpu/cpu_training.h"
#include "nn/transformer.h"
#include "isa_levels.h"
#include "test_support.h"

using namespace modscope;
namespace F = torch::nn::functional;

namespace {

struct Threads {
    int before = at::get_num_threads();
    explicit Threads(int n) { at::set_num_threads(n); }
    ~Threads() { at::set_num_threads(before); }
};

// x [..., hd] rotated by factors cos, sin [..., hd] broadcast: x * cos + swap_halves(x) * sin.
torch::Tensor rotated(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
    const auto half = x.size(-1) / 2;
    return x * cos + torch::cat({x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1) * sin;
}

// The attention written from its definition with LibTorch's operators, in double precision: qkv [B, S, 3, H,
// hd], pos [B, S], rope [L, 2, 2, 1, hd] -> [B, S, H * hd]. Query i sees keys 0 .. i (the sequence order,
// whatever the positions).
torch::Tensor referenceAttention(const torch::Tensor& qkv, const torch::Tensor& pos,
                                 const torch::Tensor& rope) {
    const auto B = qkv.size(0), S = qkv.size(1), H = qkv.size(3), hd = qkv.size(4);
    const auto f = rope.to(torch::kFloat64).index_select(0, pos.reshape(-1)).view({B, S, 2, 2, 1, hd});
    const auto q = rotated(qkv.select(2, 0), f.select(2, 0).select(2, 0), f.select(2, 1).select(2, 0));
    const auto k = rotated(qkv.select(2, 1), f.select(2, 0).select(2, 1), f.select(2, 1).select(2, 1));
    const auto v = qkv.select(2, 2);
    // [B, H, S, S]
    auto scores = torch::matmul(q.transpose(1, 2), k.transpose(1, 2).transpose(2, 3));
    const auto later = torch::ones({S, S}, torch::kBool).triu(1);
    scores = scores.masked_fill(later, -std::numeric_limits<double>::infinity());
    const auto out = torch::matmul(torch::softmax(scores, -1), v.transpose(1, 2));  // [B, H, S, hd]
    return out.transpose(1, 2).reshape({B, S, H * hd});
}

double worstRelative(const torch::Tensor& got, const torch::Tensor& want) {
    const auto w = want.to(torch::kFloat64);
    return ((got.to(torch::kFloat64) - w).abs().max() / w.abs().max().clamp_min(1e-30)).item<double>();
}

}  // namespace

class EngineTrainingOpsTest : public QObject {
    Q_OBJECT

private Q_SLOTS:
    void initTestCase() {
        // Ignored by the kernels: every row would run at the CPU's own level.
        if (!cpu::environmentIsaError().empty()) QFAIL(cpu::environmentIsaError().c_str());
    }

    // Values and gradients against the operators in double precision, from one query to three blocks of
    // kAttentionQueryBlock, with the sequence's own positions and with scattered ones (a routed layer's
    // tokens keep theirs), on one thread and on two with the same bits.
    void attentionMatchesTheOperators_data() { test::isaRows(); }
    void attentionMatchesTheOperators() {
        MODSCOPE_CASE_AT_ISA_ROW();
        torch::manual_seed(3);
        const Threads two(2);  // whatever the machine has, so that the one-thread run below differs
        const std::int64_t H = 3, hd = 32, L = 1024;
        const nn::PositionTables tables(L, hd, 10000.0);
        for (const std::int64_t S : {1, 7, 128, 129, 300}) {
            for (const bool scattered : {false, true}) {
                const std::int64_t B = 2;
                const auto pos =
                    scattered ? std::get<0>(torch::randperm(L).narrow(0, 0, B * S).view({B, S}).sort(1))
                              : torch::arange(S).unsqueeze(0).expand({B, S});
                const auto qkv = (torch::randn({B, S, 3, H, hd}) * 2).requires_grad_();
                const auto dy = torch::randn({B, S, H * hd});
                const auto out = nn::causalSelfAttention(qkv, pos, tables.rope);
                out.backward(dy);
                const auto qkv64 = qkv.detach().to(torch::kFloat64).requires_grad_();
                const auto want = referenceAttention(qkv64, pos, tables.rope);
                want.backward(dy.to(torch::kFloat64));
                const QString what =
                    QString("S %1, %2 positions").arg(S).arg(scattered ? "scattered" : "own");
                QCOMPARE(out.sizes().vec(), want.sizes().vec());
                QVERIFY2(worstRelative(out, want) < 2e-6,
                         qPrintable(what + QString(": value %1").arg(worstRelative(out, want))));
                const double g = worstRelative(qkv.grad(), qkv64.grad());
                QVERIFY2(g < 2e-5, qPrintable(what + QString(": gradient %1").arg(g)));

                if (S >= 128) {
                    // Every row loop splits its rows from 128: the same bits on one thread.
                    const auto again = qkv.detach().clone().requires_grad_();
                    torch::Tensor out1;
                    {
                        const Threads one(1);
                        out1 = nn::causalSelfAttention(again, pos, tables.rope);
                        out1.backward(dy);
                    }
                    QVERIFY(torch::equal(out1, out));
                    QVERIFY(torch::equal(again.grad(), qkv.grad()));
                }
            }
        }
    }

    // splitHeadsBackward is splitHeads' adjoint: <splitHeads(x), g> = <x, splitHeadsBackward(g)> for any x
    // and g, which holds only if it undoes the head layout and takes the rotation's transpose.
    void headSplitBackwardIsTheAdjoint_data() { test::isaRows(); }
    void headSplitBackwardIsTheAdjoint() {
        MODSCOPE_CASE_AT_ISA_ROW();
        torch::manual_seed(8);
        const std::int64_t B = 3, S = 40, H = 2, hd = 16;
        const nn::PositionTables tables(64, hd, 10000.0);
        const auto pos = torch::randint(0, 64, {B, S});
        // A strided qkv: the split reads views.
        const auto wide = torch::randn({B, S, 3, H, hd + 6}, torch::kFloat32);
        const auto x = wide.narrow(4, 3, hd);
        const auto g = torch::randn({3, B * H, S, hd});
        const auto heads = cpu::splitHeads(x, pos, tables.rope);
        QCOMPARE(heads.sizes().vec(), (std::vector<std::int64_t>{3, B * H, S, hd}));
        QVERIFY(torch::equal(heads[2][H + 1][5], x[1][5][2][1]));  // v moves as it is
        const auto back = cpu::splitHeadsBackward(g, pos, tables.rope, B);
        QCOMPARE(back.sizes().vec(), x.sizes().vec());
        const double lhs = (heads.to(torch::kFloat64) * g.to(torch::kFloat64)).sum().item<double>();
        const double rhs = (x.to(torch::kFloat64) * back.to(torch::kFloat64)).sum().item<double>();
        QVERIFY2(std::abs(lhs - rhs) < 1e-4 * std::abs(lhs),
                 qPrintable(QString("%1 vs %2").arg(lhs).arg(rhs)));
        QVERIFY_THROWS_EXCEPTION(c10::Error, cpu::splitHeads(x, pos + 64, tables.rope));
        QVERIFY_THROWS_EXCEPTION(c10::Error, cpu::splitHeads(x, pos.narrow(1, 0, S - 1), tables.rope));
    }

    // The scores' gradient from the probabilities' against autograd through the masked softmax, in strided
    // blocks after earlier keys (first > 0), rows shorter than a vector and with tails.
    void causalSoftmaxGradientMatchesAutograd_data() { test::isaRows(); }
    void causalSoftmaxGradientMatchesAutograd() {
        MODSCOPE_CASE_AT_ISA_ROW();
        torch::manual_seed(11);
        for (const auto& [n, keys, first] : {std::tuple<int, int, int>{5, 5, 0}, {19, 45, 26}, {3, 11, 2}}) {
            const auto scores = torch::randn({4, n, keys + 3}, torch::kFloat64).narrow(2, 0, keys) * 3;
            const auto later = torch::arange(keys).unsqueeze(0) > (torch::arange(n).unsqueeze(1) + first);
            const auto s = scores.clone().requires_grad_();
            const auto p = torch::softmax(s.masked_fill(later, -std::numeric_limits<double>::infinity()), -1);
            const auto dp = torch::randn({4, n, keys}, torch::kFloat64);
            p.backward(dp);
            const auto probs = p.detach().to(torch::kFloat32);
            auto grad = torch::randn({4, n, keys + 5}).narrow(2, 0, keys);  // strided rows
            grad.copy_(dp);
            cpu::causalSoftmaxBackward(probs, grad, first);
            QVERIFY2(worstRelative(grad, s.grad()) < 1e-5,
                     qPrintable(QString::number(worstRelative(grad, s.grad()))));
            QVERIFY(grad.masked_select(later.unsqueeze(0).expand({4, n, keys})).eq(0).all().item<bool>());
        }
    }

    // The loss and its gradient against F::cross_entropy in double precision: a vocabulary with a tail after
    // the vectors, strided rows, 300 rows split over two threads (the same bits on one), an upstream gradient
    // other than 1; a target out of range throws.
    void crossEntropyMatchesTheOperators_data() { test::isaRows(); }
    void crossEntropyMatchesTheOperators() {
        MODSCOPE_CASE_AT_ISA_ROW();
        torch::manual_seed(21);
        const Threads two(2);
        for (const auto& [N, V] : {std::pair<int, int>{1, 5}, {9, 37}, {300, 2048}}) {
            const auto logits = (torch::randn({N, V + 4}) * 4).narrow(1, 2, V).requires_grad_();
            const auto targets = torch::randint(0, V, {N});
            const auto loss = nn::crossEntropyLoss(logits, targets);
            (loss * 3.0).backward();
            const auto exact = logits.detach().to(torch::kFloat64).requires_grad_();
            const auto want = F::cross_entropy(exact, targets);
            (want * 3.0).backward();
            // log-sum-exp - logit cancels: float's error is relative to the logits, not to the loss.
            const double scale = want.item<double>() + exact.detach().abs().max().item<double>();
            QVERIFY2(std::abs(loss.item<double>() - want.item<double>()) < 1e-6 * scale,
                     qPrintable(QString("%1 vs %2").arg(loss.item<double>()).arg(want.item<double>())));
            // Each entry is (3 / N) (p - [target]), p in [0, 1], and p = exp(logit - lse) inherits the
            // rounding of lse, whose size is the logits' (up to about 16 here): float's error is relative to
            // 3 / N and to that.
            const double grad_error =
                (logits.grad().to(torch::kFloat64) - exact.grad()).abs().max().item<double>() * N / 3;
            QVERIFY2(grad_error < 2e-7 * scale, qPrintable(QString::number(grad_error)));
            if (N == 300) {
                const auto lse2 = cpu::crossEntropy(logits.detach(), targets);
                const Threads one(1);
                const auto lse1 = cpu::crossEntropy(logits.detach(), targets);
                QVERIFY(torch::equal(lse1.lse, lse2.lse));
                QCOMPARE(lse1.loss, lse2.loss);
            }
            // Without autograd: the same value.
            torch::NoGradGuard no_grad;
            QCOMPARE(nn::crossEntropyLoss(logits, targets).item<float>(), loss.item<float>());
        }
        const auto logits = torch::randn({4, 10});
        QVERIFY_THROWS_EXCEPTION(c10::Error, cpu::crossEntropy(logits, torch::tensor({0, 1, 10, 2})));
        QVERIFY_THROWS_EXCEPTION(c10::Error, cpu::crossEntropy(logits, torch::tensor({0, 1, 2})));
    }

    // The attention module takes the fused function when it trains: its output and the gradients of its
    // input and weights match the operators' (the module's own path without autograd gives the value).
    void attentionModuleTrainsThroughIt_data() { test::isaRows(); }
    void attentionModuleTrainsThroughIt() {
        MODSCOPE_CASE_AT_ISA_ROW();
        torch::manual_seed(4);
        ModelConfig config;
        config.d_model = 48;
        config.n_heads = 3;
        config.max_seq_len = 256;
        nn::Attention attn(config);
        const nn::PositionTables tables(config.max_seq_len, config.headDim(), config.rope_theta);
        const std::int64_t B = 2, S = 150;
        const auto pos = torch::arange(S).unsqueeze(0).expand({B, S});
        const auto x = torch::randn({B, S, config.d_model}).requires_grad_();
        const auto dy = torch::randn({B, S, config.d_model});
        const auto out = attn(x, pos, tables, nullptr);
        out.backward(dy);

        const auto x64 = x.detach().to(torch::kFloat64).requires_grad_();
        const auto wqkv = attn->qkv->weight.detach().to(torch::kFloat64).requires_grad_();
        const auto wproj = attn->proj->weight.detach().to(torch::kFloat64).requires_grad_();
        const auto qkv = F::linear(x64, wqkv).view({B, S, 3, config.n_heads, config.headDim()});
        const auto want = F::linear(referenceAttention(qkv, pos, tables.rope), wproj);
        want.backward(dy.to(torch::kFloat64));
        QVERIFY(worstRelative(out, want) < 2e-6);
        QVERIFY2(worstRelative(x.grad(), x64.grad()) < 2e-5,
                 qPrintable(QString::number(worstRelative(x.grad(), x64.grad()))));
        QVERIFY(worstRelative(attn->qkv->weight.grad(), wqkv.grad()) < 2e-5);
        QVERIFY(worstRelative(attn->proj->weight.grad(), wproj.grad()) < 2e-5);
        torch::NoGradGuard no_grad;
        QVERIFY(worstRelative(attn(x, pos, tables, nullptr), want) < 2e-6);
    }
};

MODSCOPE_ENGINE_TEST_MAIN(EngineTrainingOpsTest)
#include "engine_training_ops_test.moc"
