// The CPU kernels' instruction-set levels (cpu::Isa, cpu_kernels.h) as Qt Test rows: a test whose kernels have
// a build per level runs once per level this host has, so that an AVX-512 machine also tests the AVX2 and the
// baseline builds, which the CPU alone would never pick.
#pragma once

#include <QString>
#include <QTest>

#include "cpu/cpu_kernels.h"

Q_DECLARE_METATYPE(modscope::cpu::Isa)

namespace modscope::test {

// The rows "avx512", "avx2" and "baseline" of the column "isa"; a test with them starts with
// MODSCOPE_CASE_AT_ISA_ROW(). With MODSCOPE_TEST_ISA_ROWS=native only the row of the level this process runs
// at: the sanitizer suite, where each row costs several times as much, checks memory at that level and
// leaves the comparison of the builds, whose loops are one source, to the normal suite.
inline void isaRows() {
    QTest::addColumn<cpu::Isa>("isa");
    const bool native_only = qEnvironmentVariable("MODSCOPE_TEST_ISA_ROWS") == QLatin1String("native");
    for (const auto isa : {cpu::Isa::Avx512, cpu::Isa::Avx2, cpu::Isa::Baseline})
        if (!native_only || isa == cpu::isaLevel()) QTest::newRow(cpu::isaName(isa)) << isa;
}

// Why this process cannot run the kernels at `isa`; empty where it can.
inline QString isaUnavailable(cpu::Isa isa) {
    if (cpu::cpuIsa() < isa) {
        const char* what = isa == cpu::Isa::Avx512 ? "AVX-512" : "AVX2 with FMA (x86-64-v3)";
        return QString("this CPU has no %1: its %2 builds cannot run here").arg(what, cpu::isaName(isa));
    }
    if (cpu::environmentIsaCap() < isa)
        return QString("MODSCOPE_CPU_ISA=%1 caps this process below %2")
            .arg(cpu::isaName(cpu::environmentIsaCap()), cpu::isaName(isa));
    return {};
}

}  // namespace modscope::test

// In a test with isaRows(): skips the row where this process cannot run its level, else caps the kernels at it
// until the test returns. `isa` is the row's level.
#define MODSCOPE_CASE_AT_ISA_ROW()                                                                          \
    QFETCH(modscope::cpu::Isa, isa);                                                                        \
    if (const QString unavailable = modscope::test::isaUnavailable(isa); !unavailable.isEmpty())            \
        QSKIP(qPrintable(unavailable));                                                                     \
    const modscope::cpu::ScopedIsaCap isa_cap(isa);                                                         \
    QCOMPARE(QString(modscope::cpu::isaName(modscope::cpu::isaLevel())), QString(modscope::cpu::isaName(isa)))
