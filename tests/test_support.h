// Shared fixtures for engine tests: small configs, seeded models, a tiny trained tokenizer.
#pragma once

#include <QCoreApplication>
#include <QString>
#include <QTest>
#include <memory>
#include <string>
#include <vector>

#include "model_impl.h"
#include "modscope/engine.h"

namespace modscope::test {

// The device the device-parametrised engine tests run on: $MODSCOPE_TEST_DEVICE (scripts/gpu_check.sh sets
// "cuda"), else "cpu".
std::string device();

// Whether the dtype-parametrised engine tests run their models in float64: $MODSCOPE_TEST_DTYPE is "float64"
// (CTest's *_float64 variants set it).
bool float64();

// A seeded model for the device- and dtype-parametrised engine tests: on device(), in float64 where float64()
// says (on the ops backend, the one that runs float64), else as Model::create makes it.
std::unique_ptr<Model> createModel(const ModelConfig& config, std::uint64_t seed);

// 4 layers, d 32, 2 heads, routed layers 1 and 3: small enough for exhaustive checks in milliseconds.
ModelConfig tinyConfig(int vocab_size = 300);

// Deterministic token ids in [0, vocab).
std::vector<int> randomIds(int count, int vocab, std::uint64_t seed);

// Shifts each routed layer's predictor bias so that, in causal mode on ids, about half the tokens are
// processed: an untrained predictor tends to decide the same way for every token, which would leave the
// skip path of causal mode untested. The threshold falls midway between two of the logits on ids, never on one.
void balancePredictors(Model& model, const std::vector<int>& ids);

// tinyConfig with mixture layers 1 and 3 of three experts (docs/MODEL.md "Mixture layers"), a capacity factor
// low enough that experts overflow, and: routed, staged MoDE (the routed layers 1 and 3 hold the mixtures);
// noop > 0, integrated MoDE's no-op choices.
ModelConfig tinyMixtureConfig(bool routed, int noop, int vocab_size = 300);

// Scales every mixture router's weights by 10: at initialisation its probabilities are nearly equal, so that
// two implementations' rounding would decide many top choices; scaled, the choices are clear and varied.
void spreadExpertRouters(Model& model);

// A causal-mode forward that keeps each layer's K/V in kv (config's causal rule and capacity): the prefill
// that generation steps (ModTransformerImpl::step) continue.
nn::ForwardOptions causalPrefill(const ModelConfig& config, std::vector<nn::LayerKV>& kv);

// The largest |logit| difference between generation steps and a full forward over the whole sequence:
// step_logits[i] predicts position prompt_size + i, as the full run's logits (all positions) at
// prompt_size + i - 1 do.
double maxStepLogitGap(const std::vector<torch::Tensor>& step_logits, const RunTrace& full, std::size_t prompt_size,
                       int vocab);

// ids as a [1, T] int64 tensor on device().
torch::Tensor idsTensor(const std::vector<int>& ids);

// A SentencePiece model trained once per process on a generated English-like corpus (vocab 300).
std::string tinyTokenizerPath();
// Generated text: deterministic, varied words, punctuation, digits and newlines.
std::string syntheticCorpus(std::size_t bytes, std::uint64_t seed);

// A complete checkpoint directory (config, weights, tokenizer) for a seeded tiny model in dir.
std::unique_ptr<Model> makeCheckpoint(const std::string& dir, std::uint64_t seed = 7);

// Runs /usr/bin/python3 (Debian's, which has torch) with a script; returns stdout, fails the test on error.
QString runPython(const QString& script, const QStringList& args = {});

// The sanitizer suite sets MODSCOPE_TEST_SKIP_TOOLS: each start of an instrumented command-line tool costs
// seconds, the code those runs reach is tested in process too, and the normal suite runs the tools.
inline bool toolRunsSkipped() { return qEnvironmentVariableIsSet("MODSCOPE_TEST_SKIP_TOOLS"); }
#define MODSCOPE_SKIP_IF_NO_TOOL_RUNS()                                                                          \
    if (modscope::test::toolRunsSkipped())                                                                       \
    QSKIP("the command-line tool's runs are left to the normal suite here (MODSCOPE_TEST_SKIP_TOOLS)")

}  // namespace modscope::test

// main() of an engine test: the runtime set up as the tools set it (RuntimeOptions::forTools: the kernel backend
// enabled, so that MODSCOPE_CPU_KERNELS=0 in the environment, which CTest's *_ops variants set, runs the test on
// the ops backend), before anything starts a thread; then Qt Test.
#define MODSCOPE_ENGINE_TEST_MAIN(TestClass)                                            \
    int main(int argc, char** argv) {                                                   \
        modscope::configureRuntime(modscope::RuntimeOptions::forTools());               \
        QCoreApplication app(argc, argv);                                               \
        TestClass test;                                                                 \
        QTEST_SET_MAIN_SOURCE_PATH                                                      \
        return QTest::qExec(&test, argc, argv);                                         \
    }
