// Resident memory of the calling process, for tests that bound what a workload leaves behind.
#pragma once

#include <unistd.h>

#include <cstdio>

namespace modscope::test {

// Resident set in MB, from /proc/self/statm (0 when it cannot be read).
inline double residentMb() {
    long pages = 0, resident = 0;
    if (FILE* f = std::fopen("/proc/self/statm", "r")) {
        if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
        std::fclose(f);
    }
    return double(resident) * double(::sysconf(_SC_PAGESIZE)) / (1024.0 * 1024.0);
}

}  // namespace modscope::test
