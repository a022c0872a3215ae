// ModelConfig: JSON form, validation and derived sizes.
#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <sstream>

#include "modscope/engine.h"

namespace modscope {

namespace {

// Bounds keep a hostile config.json from asking for absurd allocations before any tensor is read.
constexpr int kMaxVocab = 1 << 20;
constexpr int kMaxDModel = 16384;
constexpr int kMaxLayers = 512;
constexpr int kMaxHeads = 256;
constexpr int kMaxDff = 1 << 17;
constexpr int kMaxSeqLen = 1 << 16;
constexpr int kMaxPredictorHidden = 1 << 14;
constexpr int kMaxExperts = 256;

void requireRange(const char* field, double value, double lo, double hi) {
    if (!(value >= lo && value <= hi)) {
        std::ostringstream msg;
        msg << "config: '" << field << "' is " << value << ", expected " << lo << " to " << hi;
        throw Error(msg.str());
    }
}

template <typename T>
T field(const nlohmann::json& j, const char* name, T fallback, bool required) {
    auto it = j.find(name);
    if (it == j.end()) {
        if (required) throw Error(std::string("config: missing field '") + name + "'");
        return fallback;
    }
    try {
        if constexpr (std::is_same_v<T, bool>) {
            if (!it->is_boolean()) throw Error("");
            return it->get<bool>();
        } else if constexpr (std::is_integral_v<T>) {
            if (!it->is_number_integer()) throw Error("");
            const auto v = it->get<std::int64_t>();
            if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max()) throw Error("");
            return static_cast<T>(v);
        } else {
            return it->get<T>();
        }
    } catch (const std::exception&) {
        throw Error(std::string("config: field '") + name + "' has the wrong type or is out of range");
    }
}

}  // namespace

bool ModelConfig::isRouted(int layer) const {
    return std::find(routed_layers.begin(), routed_layers.end(), layer) != routed_layers.end();
}

bool ModelConfig::isMoe(int layer) const {
    return std::find(moe_layers.begin(), moe_layers.end(), layer) != moe_layers.end();
}

std::vector<int> ModelConfig::everyOtherLayer(int n_layers) {
    std::vector<int> layers;
    for (int i = 1; i < n_layers; i += 2) layers.push_back(i);
    return layers;
}

void ModelConfig::validate() const {
    requireRange("vocab_size", vocab_size, 4, kMaxVocab);
    requireRange("d_model", d_model, 2, kMaxDModel);
    requireRange("n_layers", n_layers, 1, kMaxLayers);
    requireRange("n_heads", n_heads, 1, kMaxHeads);
    requireRange("d_ff", d_ff, 1, kMaxDff);
    requireRange("max_seq_len", max_seq_len, 1, kMaxSeqLen);
    requireRange("capacity", capacity, 0.0, 1.0);
    requireRange("predictor_hidden", predictor_hidden, 1, kMaxPredictorHidden);
    requireRange("predictor_threshold", predictor_threshold, 0.0, 1.0);
    requireRange("predictor_budget_gain", predictor_budget_gain, 0.0, 100.0);
    requireRange("rope_theta", rope_theta, 1.0, 1e9);
    requireRange("norm_eps", norm_eps, 1e-12, 1.0);
    if (d_model % n_heads != 0)
        throw Error("config: d_model (" + std::to_string(d_model) + ") is not divisible by n_heads (" +
                    std::to_string(n_heads) + ")");
    if (headDim() % 2 != 0)
        throw Error("config: head dimension d_model/n_heads = " + std::to_string(headDim()) +
                    " must be even for rotary embeddings");
    const auto checkLayers = [&](const std::vector<int>& layers, const char* what) {
        std::vector<int> seen;
        for (int layer : layers) {
            if (layer < 0 || layer >= n_layers)
                throw Error(std::string("config: ") + what + " " + std::to_string(layer) +
                            " does not exist (n_layers " + std::to_string(n_layers) + ")");
            if (std::find(seen.begin(), seen.end(), layer) != seen.end())
                throw Error(std::string("config: ") + what + " " + std::to_string(layer) + " is listed twice");
            seen.push_back(layer);
        }
    };
    checkLayers(routed_layers, "routed layer");
    checkLayers(moe_layers, "mixture layer");
    if (!moe_layers.empty()) {
        requireRange("n_experts", n_experts, 1, kMaxExperts);
        requireRange("noop_experts", noop_experts, 0, kMaxExperts);
        requireRange("expert_capacity_factor", expert_capacity_factor, 0.01, 1024.0);
    } else if (n_experts != 0 || noop_experts != 0) {
        throw Error("config: 'n_experts' and 'noop_experts' need 'moe_layers'");
    }
    if (parameterCount() > (std::int64_t{1} << 32))
        throw Error("config: " + std::to_string(parameterCount()) + " parameters is beyond what ModScope opens");
}

std::int64_t ModelConfig::parameterCount() const {
    const std::int64_t d = d_model, ff = d_ff, h = predictor_hidden;
    std::int64_t per_layer = 2 * d            // two RMSNorm weights
                             + 3 * d * d + d * d  // qkv, proj
                             + 2 * ff * d + ff * d;  // gate_up, down
    std::int64_t routed_extra = d               // router
                                + d * h + h + h + 1;  // predictor fc1, fc2
    // A mixture's experts replace the dense MLP; its router has a row per choice.
    std::int64_t moe_extra = (std::int64_t{n_experts} - 1) * 3 * ff * d + std::int64_t{routerChoices()} * d;
    return std::int64_t{vocab_size} * d + d + n_layers * per_layer +
           static_cast<std::int64_t>(routed_layers.size()) * routed_extra +
           static_cast<std::int64_t>(moe_layers.size()) * moe_extra;
}

ModelConfig ModelConfig::fromJson(const std::string& text) {
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(text);
    } catch (const std::exception& e) {
        throw Error(std::string("config: not valid JSON (") + e.what() + ")");
    }
    if (!j.is_object()) throw Error("config: expected a JSON object");
    // Optional for configs written before it existed; when present it must be this architecture.
    if (const auto arch = j.find("architecture"); arch != j.end() && *arch != "modscope-mod-transformer/1")
        throw Error("config: 'architecture' is " + arch->dump().substr(0, 80) +
                    ", this build reads \"modscope-mod-transformer/1\" only");
    ModelConfig c;
    c.name = field<std::string>(j, "name", c.name, false);
    c.vocab_size = field<int>(j, "vocab_size", 0, true);
    c.d_model = field<int>(j, "d_model", 0, true);
    c.n_layers = field<int>(j, "n_layers", 0, true);
    c.n_heads = field<int>(j, "n_heads", 0, true);
    c.d_ff = field<int>(j, "d_ff", 0, true);
    c.max_seq_len = field<int>(j, "max_seq_len", 0, true);
    c.capacity = field<double>(j, "capacity", c.capacity, true);
    c.predictor_hidden = field<int>(j, "predictor_hidden", c.predictor_hidden, false);
    c.predictor_threshold = field<double>(j, "predictor_threshold", c.predictor_threshold, false);
    c.predictor_budget_gain = field<double>(j, "predictor_budget_gain", c.predictor_budget_gain, false);
    c.predictor_prefix_topk = field<bool>(j, "predictor_prefix_topk", c.predictor_prefix_topk, false);
    c.rope_theta = field<double>(j, "rope_theta", c.rope_theta, false);
    c.norm_eps = field<double>(j, "norm_eps", c.norm_eps, false);
    const auto layerList = [&](const char* name, std::vector<int>& out) {
        auto it = j.find(name);
        if (!it->is_array()) throw Error(std::string("config: '") + name + "' must be an array of layer indices");
        if (it->size() > static_cast<std::size_t>(kMaxLayers))
            throw Error(std::string("config: '") + name + "' is too long");
        out.clear();
        for (const auto& v : *it) {
            if (!v.is_number_integer()) throw Error(std::string("config: '") + name + "' must hold integers");
            const auto layer = v.get<std::int64_t>();
            if (layer < 0 || layer > kMaxLayers)
                throw Error(std::string("config: '") + name + "' holds " + std::to_string(layer) +
                            ", out of range");
            out.push_back(static_cast<int>(layer));
        }
    };
    if (j.find("routed_layers") == j.end()) throw Error("config: missing field 'routed_layers'");
    layerList("routed_layers", c.routed_layers);
    // A checkpoint without a mixture (every one written before mixtures existed) has none of these.
    c.moe_layers.clear();
    if (j.find("moe_layers") != j.end()) layerList("moe_layers", c.moe_layers);
    c.n_experts = field<int>(j, "n_experts", 0, false);
    c.noop_experts = field<int>(j, "noop_experts", 0, false);
    c.expert_capacity_factor = field<double>(j, "expert_capacity_factor", c.expert_capacity_factor, false);
    c.validate();
    return c;
}

std::string ModelConfig::toJson() const {
    nlohmann::ordered_json j;
    j["name"] = name;
    j["architecture"] = "modscope-mod-transformer/1";
    j["vocab_size"] = vocab_size;
    j["d_model"] = d_model;
    j["n_layers"] = n_layers;
    j["n_heads"] = n_heads;
    j["d_ff"] = d_ff;
    j["max_seq_len"] = max_seq_len;
    j["capacity"] = capacity;
    j["routed_layers"] = routed_layers;
    j["predictor_hidden"] = predictor_hidden;
    j["predictor_threshold"] = predictor_threshold;
    j["predictor_budget_gain"] = predictor_budget_gain;
    j["predictor_prefix_topk"] = predictor_prefix_topk;
    j["rope_theta"] = rope_theta;
    j["norm_eps"] = norm_eps;
    if (!moe_layers.empty()) {
        j["moe_layers"] = moe_layers;
        j["n_experts"] = n_experts;
        j["noop_experts"] = noop_experts;
        j["expert_capacity_factor"] = expert_capacity_factor;
    }
    return j.dump(2) + "\n";
}

const char* toString(RoutingMode mode) { return mode == RoutingMode::TopK ? "topk" : "causal"; }

RoutingMode routingModeFromString(const std::string& text) {
    if (text == "topk") return RoutingMode::TopK;
    if (text == "causal") return RoutingMode::Causal;
    throw Error("unknown routing mode '" + text + "' (expected topk or causal)");
}

}  // namespace modscope
