// Causal predictor against top-k membership: confusion counts and the rates derived from them.
#include "modscope/engine.h"

namespace modscope {

namespace {
double ratio(std::int64_t num, std::int64_t den) { return den > 0 ? double(num) / double(den) : 0.0; }
}  // namespace

double Agreement::accuracy() const { return ratio(tp + tn, total()); }
double Agreement::precision() const { return ratio(tp, tp + fp); }
double Agreement::recall() const { return ratio(tp, tp + fn); }

// Mean of the recall on both classes: 'always skip' scores 0.5 here however rare top-k tokens are.
double Agreement::balancedAccuracy() const {
    const bool havePos = tp + fn > 0, haveNeg = tn + fp > 0;
    if (havePos && haveNeg) return 0.5 * (ratio(tp, tp + fn) + ratio(tn, tn + fp));
    return havePos ? ratio(tp, tp + fn) : ratio(tn, tn + fp);
}

Agreement& Agreement::operator+=(const Agreement& o) {
    tp += o.tp;
    fp += o.fp;
    tn += o.tn;
    fn += o.fn;
    return *this;
}

Agreement Agreement::of(const LayerTrace& layer) {
    Agreement a;
    if (!layer.routed) return a;
    const std::size_t n = std::min(layer.topk_selected.size(), layer.predictor_selected.size());
    for (std::size_t i = 0; i < n; ++i) {
        const bool truth = layer.topk_selected[i] != 0, pred = layer.predictor_selected[i] != 0;
        if (truth && pred) ++a.tp;
        else if (!truth && pred) ++a.fp;
        else if (!truth && !pred) ++a.tn;
        else ++a.fn;
    }
    return a;
}

}  // namespace modscope
