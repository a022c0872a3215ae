// Bounded reads and atomic writes (write to a temporary in the same folder, fsync, rename, fsync the folder).
#include "formats/file_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "modscope/engine.h"

namespace modscope {

std::string readFileBounded(const std::string& path, std::uint64_t max_bytes) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) throw Error(path + ": " + std::strerror(errno));
    if (!S_ISREG(st.st_mode)) throw Error(path + ": not a regular file");
    if (static_cast<std::uint64_t>(st.st_size) > max_bytes)
        throw Error(path + ": " + std::to_string(st.st_size) + " bytes, more than the " +
                    std::to_string(max_bytes) + " this file can hold");
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(path + ": cannot open for reading");
    std::string data(static_cast<std::size_t>(st.st_size), '\0');
    in.read(data.data(), static_cast<std::streamsize>(data.size()));
    if (in.gcount() != static_cast<std::streamsize>(data.size())) throw Error(path + ": read failed");
    return data;
}

void writeFileAtomic(const std::string& path, const std::string& data) {
    const auto slash = path.find_last_of('/');
    const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
    const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
    std::string tmpl = dir + "/." + base + ".tmp-XXXXXX";
    const int fd = ::mkstemp(tmpl.data());
    if (fd < 0) throw Error(path + ": cannot write here (" + std::strerror(errno) + ")");
    const auto fail = [&](const char* what) {
        const std::string reason = std::strerror(errno);
        ::close(fd);
        ::unlink(tmpl.c_str());
        throw Error(path + ": " + what + " failed (" + reason + "); any earlier file is left as it was");
    };
    std::size_t done = 0;
    while (done < data.size()) {
        const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
        if (n < 0) {
            if (errno == EINTR) continue;
            fail("write");
        }
        done += static_cast<std::size_t>(n);
    }
    if (::fchmod(fd, 0644) != 0) fail("chmod");
    if (::fsync(fd) != 0) fail("fsync");
    if (::close(fd) != 0) {
        const std::string reason = std::strerror(errno);
        ::unlink(tmpl.c_str());
        throw Error(path + ": close failed (" + reason + ")");
    }
    if (::rename(tmpl.c_str(), path.c_str()) != 0) {
        const std::string reason = std::strerror(errno);
        ::unlink(tmpl.c_str());
        throw Error(path + ": rename failed (" + reason + "); any earlier file is left as it was");
    }
    // The rename lives in the folder's own data: until the folder is synced, a power cut can bring back the
    // old name (or none) even though the new file's contents are on disk.
    // A folder this process may write but not read cannot be opened to sync: the rename then stands unsynced.
    const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir_fd < 0) return;
    const int sync_errno = ::fsync(dir_fd) == 0 ? 0 : errno;
    ::close(dir_fd);
    // Some file systems cannot sync a folder (EINVAL): the rename stands as they order it.
    if (sync_errno != 0 && sync_errno != EINVAL)
        throw Error(path + ": written, but syncing its folder failed (" + std::strerror(sync_errno) + ")");
}

}  // namespace modscope
