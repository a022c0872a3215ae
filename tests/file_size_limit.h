// A full disk, simulated for this process: RLIMIT_FSIZE makes writes past the limit fail (EFBIG) as they
// fail on a full disk (ENOSPC), and, unlike a read-only folder, it binds root too. SIGXFSZ is ignored
// meanwhile, so the write fails instead of killing the process. Pipes and sockets are not affected.
#pragma once

#include <sys/resource.h>

#include <csignal>

namespace modscope::test {

class FileSizeLimit {
public:
    explicit FileSizeLimit(rlim_t bytes) {
        ::getrlimit(RLIMIT_FSIZE, &old_);
        old_handler_ = std::signal(SIGXFSZ, SIG_IGN);
        rlimit limit = old_;
        limit.rlim_cur = bytes;
        ::setrlimit(RLIMIT_FSIZE, &limit);
    }
    ~FileSizeLimit() {
        ::setrlimit(RLIMIT_FSIZE, &old_);
        std::signal(SIGXFSZ, old_handler_);
    }
    FileSizeLimit(const FileSizeLimit&) = delete;
    FileSizeLimit& operator=(const FileSizeLimit&) = delete;

private:
    rlimit old_{};
    void (*old_handler_)(int) = nullptr;
};

}  // namespace modscope::test
