#include "formats/trace_text.h"

#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "formats/utf8.h"
#include "modscope/engine.h"

namespace modscope {

namespace {

// Real numbers always carry a '.' or an exponent ("1.0", "-0.0"), so that readers which type numbers by
// their look (Python's json, pandas) read a float, and -0.0 keeps its sign.
std::string withFractionMark(std::string s) {
    if (s.find_first_of(".eE") == std::string::npos) s += ".0";
    return s;
}

}  // namespace

// The shortest decimal that reads back as the same float32 both when parsed as float32 and when parsed as
// float64 and then rounded (what Python, pandas and most JSON libraries do). The shortest float32 form
// passes the second test for every finite float but two (+-7.038531e-26: double rounding), checked
// exhaustively; those get the float64 form of the value, which is exact either way.
std::string formatFloat(float v) {
    char buf[64];
    auto r = std::to_chars(buf, buf + sizeof(buf), v);
    double d = 0.0;
    std::from_chars(buf, r.ptr, d);
    const float back = static_cast<float>(d);
    if (std::memcmp(&back, &v, sizeof(float)) != 0)
        r = std::to_chars(buf, buf + sizeof(buf), static_cast<double>(v));
    return withFractionMark(std::string(buf, r.ptr));
}

std::string formatDouble(double v) {
    char buf[64];
    const auto r = std::to_chars(buf, buf + sizeof(buf), v);
    return withFractionMark(std::string(buf, r.ptr));
}

float parseFloat32(std::string_view t, const std::string& where) {
    float v = 0;
    const auto res = std::from_chars(t.data(), t.data() + t.size(), v);
    if (res.ec == std::errc::result_out_of_range)
        throw Error(where + ": " + printable(std::string(t), 40) + " is outside the float32 range");
    if (res.ec != std::errc() || res.ptr != t.data() + t.size() || !std::isfinite(v))
        throw Error(where + ": " + printable(std::string(t), 40) + " is not a finite number");
    return v;
}

std::string show(double v) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%g", v);
    return buf;
}

std::string at(const std::string& base, std::size_t i) {
    return base + "[" + std::to_string(i) + "]";
}

std::string lowerExtension(const std::string& path) {
    const auto slash = path.find_last_of('/');
    const auto dot = path.find_last_of('.');
    if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return {};
    std::string ext = path.substr(dot);
    for (auto& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return ext;
}

}  // namespace modscope
