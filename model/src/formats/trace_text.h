// How a trace writes its numbers and names its values: shared by the JSON writer and reader and the CSV.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace modscope {

// The shortest decimal that reads back as the same float32 both when parsed as float32 and when parsed as
// float64 and then rounded; always with a '.' or an exponent, so that readers typing numbers by their look
// read a float.
std::string formatFloat(float v);
std::string formatDouble(double v);

// A float32 from its decimal text; Error naming `where` when it is not a finite float32.
float parseFloat32(std::string_view text, const std::string& where);

// A number in a message ("%g").
std::string show(double v);

// A path to a value in messages: at("layers", 3) is "layers[3]".
std::string at(const std::string& base, std::size_t i);

// The extension of a path, lower case, with its dot ("" when none).
std::string lowerExtension(const std::string& path);

}  // namespace modscope
