// The virtual board's hardware: the Verilated board top (UART PHY, link endpoint, accelerator) with its
// clock loop in C++, driven through ctypes by sim/fastsim.py's BoardSim. Bytes go in and out at the
// line level: each byte the host sent is driven onto `rx` bit by bit (8N1, `divisor` cycles a bit), and
// `tx` is sampled in the middle of each bit as a host UART would.
//
// board_run feeds n_in bytes, then keeps the clock running while the board has work in hand (link active,
// accelerator busy, a byte on the line) and stops once it is quiet (status 0), or after max_cycles with
// work still in hand (status 2). The bytes the board sent are in out (at most out_cap; more is status 1).
#include <cstdint>
#include <memory>

#include "Vtop.h"
#include "verilated.h"

struct Board {
    std::unique_ptr<VerilatedContext> ctx;
    std::unique_ptr<Vtop> top;
    int divisor;
    // the host UART receiving `tx`
    int rx_state = 0;       // 0 idle, else cycles into the current byte
    int rx_bits = 0;
    uint8_t rx_byte = 0;

    void edge() {
        top->clk = 1;
        top->eval();
        top->clk = 0;
        top->eval();
    }

    // sample tx once per cycle; returns 1 and sets *b when a byte's stop bit has been sampled
    int sample_tx(uint8_t *b) {
        int level = top->tx;
        if (rx_state == 0) {
            if (!level) rx_state = 1;                     // the start bit's first cycle
            return 0;
        }
        rx_state++;
        // bit k (0 = start) is sampled at cycle k * divisor + divisor / 2 of the byte
        int t = rx_state - 1;
        if (t % divisor != divisor / 2) return 0;
        int k = t / divisor;
        if (k == 0) {
            if (level) rx_state = 0;                      // a glitch, not a start bit
            rx_bits = 0;
            rx_byte = 0;
        } else if (k <= 8) {
            rx_byte |= level << (k - 1);
        } else {
            rx_state = 0;
            if (level) { *b = rx_byte; return 1; }      // a framing error drops the byte, as a UART does
        }
        return 0;
    }
};

extern "C" {

void *board_open(int divisor) {
    auto *d = new Board;
    d->ctx = std::make_unique<VerilatedContext>();
    d->top = std::make_unique<Vtop>(d->ctx.get());
    d->divisor = divisor;
    d->top->clk = 0;
    d->top->rx = 1;
    d->top->rst = 1;
    d->top->eval();
    for (int k = 0; k < 4; k++) d->edge();
    d->top->rst = 0;
    d->top->eval();
    return d;
}

// power-on reset: as pressing the board's reset button (the board then announces itself)
void board_reset(void *h) {
    auto *d = static_cast<Board *>(h);
    d->top->rx = 1;
    d->top->rst = 1;
    for (int k = 0; k < 4; k++) d->edge();
    d->top->rst = 0;
    d->top->eval();
    d->rx_state = 0;
}

int board_run(void *h, const uint8_t *in, uint64_t n_in, uint8_t *out, uint64_t out_cap, uint64_t max_cycles,
              uint64_t *n_out, uint64_t *cycles_out) {
    auto *d = static_cast<Board *>(h);
    Vtop *top = d->top.get();
    const int bit_cycles = d->divisor, byte_cycles = 10 * d->divisor;
    uint64_t cycle = 0, sent = 0, got = 0, quiet = 0;
    int phase = 0;                                          // cycle within the byte being driven
    int status = 0;
    for (;;) {
        if (sent < n_in) {
            int bit = phase / bit_cycles;                   // 0 start, 1-8 data LSB first, 9 stop
            top->rx = bit == 0 ? 0 : bit == 9 ? 1 : (in[sent] >> (bit - 1)) & 1;
            if (++phase == byte_cycles) { phase = 0; sent++; }
        } else {
            top->rx = 1;
        }
        d->edge();
        cycle++;
        uint8_t b;
        if (d->sample_tx(&b)) {
            if (got == out_cap) { status = 1; break; }
            out[got++] = b;
        }
        bool busy = sent < n_in || top->active || top->busy || d->rx_state != 0 || !top->tx;
        quiet = busy ? 0 : quiet + 1;
        // quiet for two byte times: the UART TX has nothing buffered either
        if (sent == n_in && quiet > (uint64_t)(2 * byte_cycles)) break;
        if (sent == n_in && cycle >= max_cycles && d->rx_state == 0) { status = 2; break; }   // never split a byte
    }
    *n_out = got;
    *cycles_out = cycle;
    return status;
}

void board_close(void *h) {
    auto *d = static_cast<Board *>(h);
    d->top->final();
    delete d;
}

}  // extern "C"
