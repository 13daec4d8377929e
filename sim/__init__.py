"""Simulation: Verilator set-up, cocotb benches and the fast C++-clocked model the runtime drives."""
