// The zip container of weights.pt, checked before LibTorch opens it.
#pragma once

#include <string>

namespace modscope {

// Throws Error naming the problem unless bytes are a zip archive LibTorch's PyTorchStreamReader reads
// without failing part-way: every record stored uncompressed (so no record can claim more memory than the
// file has), inside the file, with a matching CRC-32; one top folder holding "version" (a supported format
// version) and "data.pkl". LibTorch 1.13 leaks its zip reader's state when its constructor throws, and the
// buffer of a record whose CRC does not match (fuzz_checkpoint found both): after this check neither can
// happen, and a compressed record (a zip bomb) never reaches it.
void checkWeightsContainer(const std::string& bytes);

}  // namespace modscope
