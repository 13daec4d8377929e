// The fast simulated device: the Verilated accelerator top with its clock loop in C++, as a shared
// library that Python drives through ctypes (sim/fastsim.py). The model lives between calls, like a
// board: pool contents and counters persist; ambert_reset() pulses the reset.
//
// ambert_run sends n_in words on the `i` stream and collects answers from `o` until every word was taken,
// at least `expect` answers came, and the device has been quiet (no transfer, not busy) for 16 cycles.
// It stops early after max_cycles (returns 1) or after idle_limit quiet cycles before that (a hang,
// returns 2). ambert_fetch copies the answers out.
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "Vtop.h"
#include "verilated.h"
#include "Vtop___024root.h"
#if defined(AMBERT_WAVES_FST)
#define AMBERT_WAVES
#include "verilated_fst_c.h"
typedef VerilatedFstC Trace;
#elif defined(AMBERT_WAVES_VCD)
#define AMBERT_WAVES
#include "verilated_vcd_c.h"
typedef VerilatedVcdC Trace;
#endif

// Amaranth joins interface members with "__", which Verilator escapes as "___05F".
#define I_VALID i___05Fvalid
#define I_READY i___05Fready
#define I_PAYLOAD i___05Fpayload
#define O_VALID o___05Fvalid
#define O_READY o___05Fready
#define O_PAYLOAD o___05Fpayload

// The falling edge only has to show the model its clock went low (no logic runs on it), but a full
// eval() also re-runs every combinational path from the inputs (~4% of the 16x16 model's time). Where
// the model has Verilator's (5.x) previous-clock trigger variable, the loop sets that instead; otherwise
// (another Verilator) it evaluates. Waveform builds always evaluate, so the dump sees the edge.
template <typename Root>
static auto clock_low_without_eval(Root *root, int) -> decltype(root->__Vtrigprevexpr___TOP__clk__0 = 0, bool()) {
    root->__Vtrigprevexpr___TOP__clk__0 = 0;
    return true;
}
template <typename Root>
static bool clock_low_without_eval(Root *, long) { return false; }

struct Device {
    std::unique_ptr<VerilatedContext> ctx;
    std::unique_ptr<Vtop> top;
#ifdef AMBERT_WAVES
    std::unique_ptr<Trace> tfp;
#endif
    uint64_t time = 0;
    std::vector<uint32_t> answers;

    void edge() {
        // the rising edge, then the falling edge; every input is set before this and every output this
        // loop reads (ready, valid, payload) depends on registers only, so two evaluations a cycle suffice
        top->clk = 1;
        top->eval();
#ifdef AMBERT_WAVES
        if (tfp) tfp->dump(time);
#endif
        time++;
        top->clk = 0;
#ifdef AMBERT_WAVES
        top->eval();
        if (tfp) tfp->dump(time);
#else
        if (!clock_low_without_eval(top->rootp, 0)) top->eval();
#endif
        time++;
    }
};

extern "C" {

void *ambert_open(const char *waves) {
    auto *d = new Device;
    d->ctx = std::make_unique<VerilatedContext>();
    d->top = std::make_unique<Vtop>(d->ctx.get());
#ifdef AMBERT_WAVES
    if (waves && *waves) {
        d->ctx->traceEverOn(true);
        d->tfp = std::make_unique<Trace>();
        d->top->trace(d->tfp.get(), 99);
        d->tfp->open(waves);
    }
#else
    (void)waves;
#endif
    d->top->clk = 0;
    d->top->I_VALID = 0;
    d->top->O_READY = 0;
    d->top->rst = 1;
    d->top->eval();
    for (int k = 0; k < 4; k++) d->edge();
    d->top->rst = 0;
    d->edge();          // the reset pin is registered: the accelerator leaves reset at this edge
    return d;
}

void ambert_reset(void *h) {
    auto *d = static_cast<Device *>(h);
    d->top->I_VALID = 0;
    d->top->rst = 1;
    for (int k = 0; k < 4; k++) d->edge();
    d->top->rst = 0;
    d->edge();
}

int ambert_run(void *h, const uint32_t *in, uint64_t n_in, uint64_t expect, uint64_t max_cycles,
               uint64_t idle_limit, uint64_t *cycles_out, uint64_t *taken_out, uint64_t *answers_out) {
    auto *d = static_cast<Device *>(h);
    Vtop *top = d->top.get();
    d->answers.clear();
    uint64_t cycle = 0, idle = 0, taken = 0;
    int status = 0;
    top->O_READY = 1;
    for (;;) {
        bool more = taken < n_in;
        top->I_VALID = more;
        top->I_PAYLOAD = more ? in[taken] : 0;
        bool took = more && top->I_READY;
        bool gave = top->O_VALID;
        if (gave) d->answers.push_back(top->O_PAYLOAD);
        d->edge();
        cycle++;
        if (took) taken++;
        idle = (took || gave || top->busy) ? 0 : idle + 1;
        if (taken == n_in && d->answers.size() >= expect && idle >= 16) break;
        if (cycle >= max_cycles) { status = 1; break; }
        if (idle >= idle_limit) { status = 2; break; }
    }
    top->I_VALID = 0;
    top->eval();
#ifdef AMBERT_WAVES
    if (d->tfp) d->tfp->flush();
#endif
    *cycles_out = cycle;
    *taken_out = taken;
    *answers_out = d->answers.size();
    return status;
}

void ambert_fetch(void *h, uint32_t *out) {
    auto *d = static_cast<Device *>(h);
    std::memcpy(out, d->answers.data(), d->answers.size() * sizeof(uint32_t));
}

void ambert_close(void *h) {
    auto *d = static_cast<Device *>(h);
    d->top->final();
#ifdef AMBERT_WAVES
    if (d->tfp) d->tfp->close();
#endif
    delete d;
}

}  // extern "C"
