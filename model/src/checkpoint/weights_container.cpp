// A bounded reading of the zip format (PKWARE APPNOTE 6.3): the end of central directory record (and its
// zip64 form, which LibTorch always writes), the central directory, and each record's local header.
#include "checkpoint/weights_container.h"

#include <caffe2/serialize/versions.h>

#include <array>
#include <cctype>
#include <cstdint>
#include <set>

#include "modscope/engine.h"

namespace modscope {

namespace {

constexpr std::uint32_t kEndOfCentralDir = 0x06054b50;
constexpr std::uint32_t kZip64Locator = 0x07064b50;
constexpr std::uint32_t kZip64EndOfCentralDir = 0x06064b50;
constexpr std::uint32_t kCentralHeader = 0x02014b50;
constexpr std::uint32_t kLocalHeader = 0x04034b50;
constexpr std::size_t kMaxRecords = 1 << 16;  // a model has a few hundred tensors at most

[[noreturn]] void corrupt(const std::string& what) {
    throw Error("not a readable weights file (its zip container is corrupt: " + what + ")");
}

class Bytes {
public:
    explicit Bytes(const std::string& b) : b_(b) {}
    std::uint64_t size() const { return b_.size(); }
    // Little-endian unsigned integer of n bytes at pos; corrupt() when it does not lie inside the file.
    std::uint64_t le(std::uint64_t pos, int n, const char* what) const {
        if (pos > b_.size() || std::uint64_t(n) > b_.size() - pos) corrupt(std::string(what) + " lies past the end");
        std::uint64_t v = 0;
        for (int i = n - 1; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(b_[pos + i]);
        return v;
    }
    std::string str(std::uint64_t pos, std::uint64_t n, const char* what) const {
        if (pos > b_.size() || n > b_.size() - pos) corrupt(std::string(what) + " lies past the end");
        return b_.substr(pos, n);
    }
    const std::string& data() const { return b_; }

private:
    const std::string& b_;
};

std::uint32_t crc32(const std::string& data, std::uint64_t pos, std::uint64_t n) {
    static const auto table = [] {
        std::array<std::uint32_t, 256> t{};
        for (std::uint32_t i = 0; i < 256; ++i) {
            std::uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            t[i] = c;
        }
        return t;
    }();
    std::uint32_t c = 0xFFFFFFFFu;
    for (std::uint64_t i = pos; i < pos + n; ++i) c = table[(c ^ static_cast<unsigned char>(data[i])) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

// Names as the zip reader compares them: ASCII letters folded to lower case.
std::string folded(std::string name) {
    for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return name;
}

struct Record {
    std::string name;
    std::uint64_t data_offset = 0;
    std::uint64_t size = 0;
    std::uint32_t crc = 0;
};

}  // namespace

void checkWeightsContainer(const std::string& data) {
    const Bytes b(data);
    if (b.size() < 22 || b.le(0, 4, "the first header") != kLocalHeader) corrupt("it does not start like a zip file");

    // The end of central directory record: the last one, within the 64 kB a comment can take.
    std::uint64_t eocd = b.size() - 22;
    const std::uint64_t lowest = b.size() >= 22 + 0xFFFF ? b.size() - 22 - 0xFFFF : 0;
    while (b.le(eocd, 4, "the end record") != kEndOfCentralDir) {
        if (eocd == lowest) corrupt("no end of central directory");
        --eocd;
    }
    if (b.le(eocd + 4, 2, "the end record") != 0 || b.le(eocd + 6, 2, "the end record") != 0)
        corrupt("a multi-disk archive");
    std::uint64_t entries = b.le(eocd + 10, 2, "the end record");
    std::uint64_t cd_size = b.le(eocd + 12, 4, "the end record");
    std::uint64_t cd_offset = b.le(eocd + 16, 4, "the end record");
    std::uint64_t cd_end_limit = eocd;
    if (eocd >= 20 && b.le(eocd - 20, 4, "the zip64 locator") == kZip64Locator) {
        const std::uint64_t z = b.le(eocd - 20 + 8, 8, "the zip64 locator");
        if (z > eocd - 20 || b.le(z, 4, "the zip64 end record") != kZip64EndOfCentralDir)
            corrupt("the zip64 end record is not where its locator says");
        entries = b.le(z + 32, 8, "the zip64 end record");
        cd_size = b.le(z + 40, 8, "the zip64 end record");
        cd_offset = b.le(z + 48, 8, "the zip64 end record");
        cd_end_limit = z;
    }
    if (entries == 0) corrupt("no records");
    if (entries > kMaxRecords) corrupt(std::to_string(entries) + " records");
    if (cd_offset > cd_end_limit || cd_size > cd_end_limit - cd_offset || cd_size < entries * 46)
        corrupt("the central directory does not fit the file");

    std::vector<Record> records;
    std::set<std::string> names;
    std::uint64_t pos = cd_offset;
    for (std::uint64_t i = 0; i < entries; ++i) {
        if (pos + 46 > cd_offset + cd_size || b.le(pos, 4, "a central header") != kCentralHeader)
            corrupt("central directory entry " + std::to_string(i) + " is malformed");
        const auto flags = b.le(pos + 8, 2, "a central header");
        const auto method = b.le(pos + 10, 2, "a central header");
        Record r;
        r.crc = static_cast<std::uint32_t>(b.le(pos + 16, 4, "a central header"));
        std::uint64_t comp = b.le(pos + 20, 4, "a central header");
        std::uint64_t uncomp = b.le(pos + 24, 4, "a central header");
        const auto name_len = b.le(pos + 28, 2, "a central header");
        const auto extra_len = b.le(pos + 30, 2, "a central header");
        const auto comment_len = b.le(pos + 32, 2, "a central header");
        std::uint64_t local = b.le(pos + 42, 4, "a central header");
        if (b.le(pos + 34, 2, "a central header") != 0) corrupt("a multi-disk archive");
        r.name = b.str(pos + 46, name_len, "a record name");
        if (r.name.empty()) corrupt("a record has no name");
        // Values that do not fit 32 bits are in the zip64 extra field, in this order. Every field must lie inside
        // the extra area, and only the first zip64 field counts: what LibTorch's zip reader (miniz) does.
        const std::uint64_t extra_end = pos + 46 + name_len + extra_len;
        for (std::uint64_t e = pos + 46 + name_len; e < extra_end;) {
            if (extra_end - e < 4) corrupt("'" + r.name + "' has a malformed extra field");
            const auto id = b.le(e, 2, "an extra field");
            const auto len = b.le(e + 2, 2, "an extra field");
            if (extra_end - e - 4 < len) corrupt("'" + r.name + "' has a malformed extra field");
            if (id == 0x0001) {
                std::uint64_t f = e + 4;
                const std::uint64_t end = e + 4 + len;
                for (std::uint64_t* v : {&uncomp, &comp, &local}) {
                    if (*v != 0xFFFFFFFFu) continue;
                    if (f + 8 > end) corrupt("a short zip64 extra field");
                    *v = b.le(f, 8, "a zip64 extra field");
                    f += 8;
                }
                break;
            }
            e += 4 + len;
        }
        if (flags & (0x0001 | 0x0040 | 0x2000)) corrupt("'" + r.name + "' is encrypted");
        // Bit 5, patch data: the zip reader refuses the record when asked for its size (fuzz_checkpoint found
        // LibTorch then throwing out of its reader's constructor, which leaks the reader).
        if (flags & 0x0020) corrupt("'" + r.name + "' is patch data");
        // The zip reader hands out a directory as an empty record without reading it (fuzz_checkpoint found
        // LibTorch then parsing an uninitialised buffer as the format version).
        const auto external = b.le(pos + 38, 4, "a central header");
        if ((external & 0x10) != 0 || r.name.back() == '/') corrupt("'" + r.name + "' is a directory");
        if (method != 0) corrupt("'" + r.name + "' is compressed (LibTorch stores every record as it is)");
        if (comp != uncomp) corrupt("'" + r.name + "' has two different sizes");
        // LibTorch's zip reader looks names up ignoring case: two names that differ only in case would let it
        // read another record than the one checked here.
        if (!names.insert(folded(r.name)).second) corrupt("the record name '" + r.name + "' is repeated");
        // Its local header, and the data after it, inside the part of the file before the directory.
        if (local > cd_offset || b.le(local, 4, "a local header") != kLocalHeader ||
            b.le(local + 8, 2, "a local header") != 0)
            corrupt("the local header of '" + r.name + "' is malformed");
        r.data_offset = local + 30 + b.le(local + 26, 2, "a local header") + b.le(local + 28, 2, "a local header");
        r.size = uncomp;
        if (r.data_offset > cd_offset || r.size > cd_offset - r.data_offset)
            corrupt("'" + r.name + "' lies outside the file");
        if (crc32(data, r.data_offset, r.size) != r.crc) corrupt("the CRC-32 of '" + r.name + "' does not match");
        records.push_back(std::move(r));
        pos += 46 + name_len + extra_len + comment_len;
    }

    // LibTorch's reader takes the first record's folder as the archive's, and reads its version at once, from
    // .data/version when there is one, else from version, looking names up ignoring case. Whatever it would
    // refuse there must be refused here: an exception out of its constructor leaks the open zip reader.
    const auto slash = records.front().name.find('/');
    if (slash == std::string::npos) corrupt("its records are not in a folder");
    const std::string prefix = records.front().name.substr(0, slash + 1);
    const auto find = [&](const std::string& name) -> const Record* {
        const std::string wanted = folded(prefix + name);
        for (const auto& r : records)
            if (folded(r.name) == wanted) return &r;
        return nullptr;
    };
    const Record* version = find(".data/version");
    if (!version) version = find("version");
    if (!version) corrupt("no " + prefix + "version record");
    if (!find("data.pkl")) corrupt("no " + prefix + "data.pkl record");
    std::string text = b.str(version->data_offset, version->size, "the version record");
    while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == ' ')) text.pop_back();
    std::uint64_t v = 0;
    bool ok = !text.empty() && text.size() <= 6;
    for (const char c : text) ok = ok && c >= '0' && c <= '9', v = v * 10 + std::uint64_t(c - '0');
    if (!ok || v < caffe2::serialize::kMinSupportedFileFormatVersion ||
        v > caffe2::serialize::kMaxSupportedFileFormatVersion)
        corrupt("format version '" + text.substr(0, 16) + "' is not one this LibTorch reads");
}

}  // namespace modscope
