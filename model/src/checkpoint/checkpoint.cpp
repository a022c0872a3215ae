// weights.pt reading and writing with full validation: the file is untrusted input.
#include "checkpoint/checkpoint.h"

#include "checkpoint/weights_container.h"

#include <caffe2/serialize/inline_container.h>
#include <caffe2/serialize/read_adapter_interface.h>
#include <torch/csrc/jit/serialization/import_read.h>
#include <torch/serialize.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <sstream>

namespace modscope {

namespace {

std::string shapeString(const at::IntArrayRef sizes) {
    std::ostringstream out;
    out << "[";
    for (std::size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
    out << "]";
    return out.str();
}

// LibTorch 1.13's pickle_load reads the zip container through an adapter that copies whatever range the zip
// reader asks for, past the end of the buffer when the file is truncated or its directory lies: a heap
// overflow that fuzz_checkpoint found on its first seed (a weights.pt cut in half). This adapter copies only
// bytes that exist; a short read makes the zip reader fail with an error instead.
class BoundedReader : public caffe2::serialize::ReadAdapterInterface {
public:
    explicit BoundedReader(const std::string& data) : data_(data) {}
    std::size_t size() const override { return data_.size(); }
    std::size_t read(std::uint64_t pos, void* buf, std::size_t n, const char* /*what*/) const override {
        if (pos >= data_.size()) return 0;
        const auto available = static_cast<std::size_t>(std::min<std::uint64_t>(n, data_.size() - pos));
        std::memcpy(buf, data_.data() + pos, available);
        return available;
    }

private:
    const std::string& data_;
};

// torch::pickle_load, with the bounded adapter: the container torch::pickle_save and Python's torch.save
// write (a zip of data.pkl and one record per tensor).
c10::IValue unpickleWeights(const std::string& bytes) {
    caffe2::serialize::PyTorchStreamReader reader(std::make_shared<BoundedReader>(bytes));
    return torch::jit::readArchiveAndTensors("data", /*pickle_prefix=*/"", /*tensor_prefix=*/"",
                                             /*type_resolver=*/c10::nullopt, /*obj_loader=*/c10::nullopt,
                                             /*device=*/c10::nullopt, reader);
}

}  // namespace

std::uint64_t maxWeightsFileBytes(const ModelConfig& config) {
    const auto params = static_cast<std::uint64_t>(config.parameterCount());
    return params * 4 + 64 * 1024 + 1024 * static_cast<std::uint64_t>(config.n_layers);
}

std::uint64_t minWeightsFileBytes(const ModelConfig& config) {
    return static_cast<std::uint64_t>(config.parameterCount()) * 2;
}

std::string serializeWeights(nn::ModTransformerImpl& net, bool half) {
    c10::Dict<std::string, at::Tensor> dict;
    for (const auto& p : net.named_parameters())
        dict.insert(p.key(), p.value().detach().to(torch::kCPU, half ? torch::kFloat16 : torch::kFloat32).contiguous());
    const auto bytes = torch::pickle_save(c10::IValue(dict));
    return std::string(bytes.begin(), bytes.end());
}

void loadWeights(nn::ModTransformerImpl& net, const std::string& bytes, const std::string& source) {
    if (bytes.empty()) throw Error(source + ": empty file");
    try {
        checkWeightsContainer(bytes);
    } catch (const Error& e) {
        throw Error(source + ": " + e.what());
    }
    c10::IValue value;
    try {
        value = unpickleWeights(bytes);
    } catch (const std::exception& e) {
        std::string what = e.what();
        if (const auto nl = what.find('\n'); nl != std::string::npos) what.resize(nl);
        throw Error(source + ": not a readable weights file (" + what + ")");
    }
    if (!value.isGenericDict()) throw Error(source + ": expected a dict from parameter name to tensor");

    std::map<std::string, at::Tensor> loaded;
    for (const auto& entry : value.toGenericDict()) {
        if (!entry.key().isString()) throw Error(source + ": a key of the dict is not a string");
        const std::string name = entry.key().toStringRef();
        if (!entry.value().isTensor()) throw Error(source + ": '" + name + "' is not a tensor");
        loaded[name] = entry.value().toTensor();
    }

    auto params = net.named_parameters();
    for (const auto& p : params) {
        const auto it = loaded.find(p.key());
        if (it == loaded.end()) throw Error(source + ": missing tensor '" + p.key() + "'");
        const auto& t = it->second;
        if (t.scalar_type() != torch::kFloat32 && t.scalar_type() != torch::kFloat16)
            throw Error(source + ": tensor '" + p.key() + "' has dtype " + std::string(c10::toString(t.scalar_type())) +
                        ", expected float32 (or float16)");
        if (t.sizes() != p.value().sizes())
            throw Error(source + ": tensor '" + p.key() + "' has shape " + shapeString(t.sizes()) +
                        ", the config needs " + shapeString(p.value().sizes()));
        if (t.layout() != torch::kStrided || t.is_quantized() || t.is_sparse())
            throw Error(source + ": tensor '" + p.key() + "' is not a dense tensor");
        if (!torch::isfinite(t).all().item<bool>())
            throw Error(source + ": tensor '" + p.key() + "' holds NaN or infinite values");
    }
    for (const auto& [name, t] : loaded) {
        if (params.find(name) == nullptr)
            throw Error(source + ": unexpected tensor '" + name + "' (not part of this config's model)");
    }
    torch::NoGradGuard no_grad;
    for (auto& p : params) p.value().copy_(loaded[p.key()]);  // float16 widens to float32 exactly
}

}  // namespace modscope
