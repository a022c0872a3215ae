// SHA-256 of a byte string, as lowercase hex (names a weights file in traces).
#pragma once
#include <string>

namespace modscope {
std::string sha256Hex(const std::string& data);
}
