// The model config the checkpoint seeds in fuzz/corpus/checkpoint were written for
// (fuzz/make_checkpoint_seeds.py); shared by the fuzz target and checkpoint_test, which loads the seeds.
#pragma once

#include "modscope/engine.h"

namespace modscope::fuzz {

inline ModelConfig checkpointSeedConfig() {
    ModelConfig c;
    c.name = "fuzz";
    c.vocab_size = 16;
    c.d_model = 8;
    c.n_layers = 2;
    c.n_heads = 2;
    c.d_ff = 16;
    c.max_seq_len = 16;
    c.routed_layers = {1};
    c.predictor_hidden = 4;
    c.validate();
    return c;
}

}  // namespace modscope::fuzz
