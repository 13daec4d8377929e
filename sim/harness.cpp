// Clock loop for the Verilated accelerator top: no Python per cycle.
//
//   harness IN OUT EXPECT MAX_CYCLES IDLE_LIMIT [WAVES.fst]
//
// IN holds the little-endian 32-bit words to send on the `i` stream. The loop runs until every input word
// was taken, at least EXPECT answer words came out of `o`, and the device has been quiet (no transfer,
// not busy) for 16 cycles; or until MAX_CYCLES; or until IDLE_LIMIT quiet cycles before that (a hang).
// OUT gets:
//   u32 status (0 done, 1 max cycles, 2 idle/hang), u32 words taken, u64 cycles, u32 n, n x u32 answers.
#include <cstdint>
#include <cstdio>
#include <memory>
#include <vector>

#include "Vtop.h"
#include "verilated.h"
// Amaranth joins interface members with "__", which Verilator escapes as "___05F".
#ifdef AMBERT_WAVES
#include "verilated_fst_c.h"
#endif

static std::vector<uint32_t> read_words(const char *path) {
    std::vector<uint32_t> words;
    FILE *f = std::fopen(path, "rb");
    if (!f) { std::perror(path); std::exit(3); }
    uint32_t w;
    while (std::fread(&w, 4, 1, f) == 1) words.push_back(w);
    std::fclose(f);
    return words;
}

int main(int argc, char **argv) {
    if (argc < 6) { std::fprintf(stderr, "usage: %s IN OUT EXPECT MAX_CYCLES IDLE_LIMIT [WAVES]\n", argv[0]); return 3; }
    std::vector<uint32_t> in = read_words(argv[1]);
    uint64_t expect = std::strtoull(argv[3], nullptr, 10);
    uint64_t max_cycles = std::strtoull(argv[4], nullptr, 10);
    uint64_t idle_limit = std::strtoull(argv[5], nullptr, 10);

    auto ctx = std::make_unique<VerilatedContext>();
    auto top = std::make_unique<Vtop>(ctx.get());
#ifdef AMBERT_WAVES
    std::unique_ptr<VerilatedFstC> tfp;
    if (argc > 6) { ctx->traceEverOn(true); tfp = std::make_unique<VerilatedFstC>(); top->trace(tfp.get(), 99); tfp->open(argv[6]); }
#endif
    std::vector<uint32_t> out;
    uint64_t cycle = 0, idle = 0, taken = 0;
    uint32_t status = 0;
    top->rst = 1; top->clk = 0; top->i___05Fvalid = 0; top->o___05Fready = 0;
    for (int k = 0; k < 4; k++) { top->clk = 1; top->eval(); top->clk = 0; top->eval(); }
    top->rst = 0;
    for (;;) {
        bool more = taken < in.size();
        top->i___05Fvalid = more;
        top->i___05Fpayload = more ? in[taken] : 0;
        top->o___05Fready = 1;
        top->eval();
        bool took = more && top->i___05Fready;
        bool gave = top->o___05Fvalid;
        uint32_t answer = top->o___05Fpayload;
        top->clk = 1; top->eval();
#ifdef AMBERT_WAVES
        if (tfp) tfp->dump(2 * cycle + 1);
#endif
        top->clk = 0; top->eval();
#ifdef AMBERT_WAVES
        if (tfp) tfp->dump(2 * cycle + 2);
#endif
        cycle++;
        if (took) taken++;
        if (gave) out.push_back(answer);
        idle = (took || gave || top->busy) ? 0 : idle + 1;
        if (taken == in.size() && out.size() >= expect && idle >= 16) break;
        if (cycle >= max_cycles) { status = 1; break; }
        if (idle >= idle_limit) { status = 2; break; }
    }
#ifdef AMBERT_WAVES
    if (tfp) tfp->close();
#endif
    top->final();
    FILE *f = std::fopen(argv[2], "wb");
    if (!f) { std::perror(argv[2]); return 3; }
    uint32_t t32 = (uint32_t)taken, n = (uint32_t)out.size();
    std::fwrite(&status, 4, 1, f); std::fwrite(&t32, 4, 1, f); std::fwrite(&cycle, 8, 1, f);
    std::fwrite(&n, 4, 1, f); std::fwrite(out.data(), 4, out.size(), f);
    std::fclose(f);
    return 0;
}
