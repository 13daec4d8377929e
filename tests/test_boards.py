"""Board files, their clocks and PLLs, the build's fit check, and the programming step's messages."""

import json
from fractions import Fraction
from pathlib import Path
import re
import subprocess

import numpy as np
import pytest

from ambert.boards import BOARD_NAMES, get_board
from ambert.boards.board import Board, Size, ecp5_pll_params, ice40_pll_params
from ambert.hw.config import AcceleratorConfig
from ambert.proto.isa import DeviceShape, Error, Mode, parse_status


@pytest.mark.parametrize("name", BOARD_NAMES)
def test_board_files_are_consistent(name):
    board = get_board(name)
    assert board.name == name and {"small", "target"} <= set(board.size_names)
    for size in board.size_names:
        # (the UART PHY's minimum: 4 cycles a bit)
        assert board.divisor(size) * board.baud == round(board.clock(size)) and board.divisor(size) >= 4
    small, target = board.config("small"), board.config("target")
    assert small.shape.lanes <= target.shape.lanes


def test_bad_board_requests_name_the_choices():
    with pytest.raises(ValueError, match="unknown board 'nexys'.*icebreaker, ulx3s"):
        get_board("nexys")
    with pytest.raises(ValueError, match="has sizes small, medium, target, not 'huge'"):
        get_board("ulx3s").config("huge")
    with pytest.raises(ValueError, match="3000000 baud is 3.33 cycles a bit of the 10.0 MHz clock; the UART "
                                         "takes at least 4"):
        Board("x", object, "ecp5", 10e6, 3_000_000)


@pytest.mark.parametrize("f_out", [30e6, 50e6, 60e6, 75e6, 100e6, 125e6])
def test_ecp5_pll_settings_make_the_frequency_with_the_vco_in_range(f_out):
    op_div, ref, fb = ecp5_pll_params(25e6, f_out)
    assert 25e6 / ref * fb == f_out and 400e6 <= f_out * op_div <= 800e6 and 25e6 / ref >= 3.125e6


@pytest.mark.parametrize("f_out", [24e6, 30e6, 36e6, 48e6])
def test_ice40_pll_settings_make_the_frequency_with_pfd_and_vco_in_range(f_out):
    divr, divf, divq, _ = ice40_pll_params(12e6, f_out)
    pfd = 12e6 / (divr + 1)
    assert 10e6 <= pfd <= 133e6 and 533e6 <= pfd * (divf + 1) <= 1066e6
    assert abs(pfd * (divf + 1) / 2 ** divq - f_out) < 1


@pytest.mark.parametrize("f_in, f_out, want", [(12e6, 30e6, (0, 79, 5, 1)), (12e6, 96e6, (0, 63, 3, 1)),
                                               (48e6, 100e6, (2, 49, 3, 1)), (48e6, 150e6, (1, 24, 2, 2)),
                                               (48e6, 60e6, (0, 19, 4, 4))])
def test_ice40_pll_settings_are_icepll_s(f_in, f_out, want):
    """DIVR, DIVF, DIVQ and FILTER_RANGE as IceStorm's icepll prints them for these frequencies."""
    assert ice40_pll_params(f_in, f_out) == want


def test_impossible_plls_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="no iCE40 PLL setting makes 1000.0 MHz from 12.0 MHz"):
        ice40_pll_params(12e6, 1000e6)
    with pytest.raises(ValueError, match="no ECP5 PLL setting makes 33.3"):
        ecp5_pll_params(25e6, 33.3e6)
    with pytest.raises(ValueError, match="no ECP5 PLL setting makes 48.0"):     # would need a 1 MHz PFD
        ecp5_pll_params(25e6, 48e6)


def test_the_dsp_layout_puts_each_array_column_on_adjacent_multipliers_of_one_strip():
    from ambert.boards.layout import SITES, array_bels, constrain_array
    bels = array_bels(12, 12)
    assert len(set(bels.values())) == 144 <= SITES
    site = {b: tuple(int(v) for v in re.match(r"X(\d+)/Y(\d+)/MULT18_(\d)$", b).groups()) for b in bels.values()}
    assert {y for _, y, _ in site.values()} == {10, 34, 58}
    for j in range(12):
        column = [site[bels[i, j]] for i in range(12)]
        assert len({y for _, y, _ in column}) == 1                      # one strip
        xs = [x for x, _, _ in column]
        assert xs == sorted(xs) and xs[-1] - xs[0] <= 3 * 9           # in order, within three blocks
        assert all(x - slot in (4, 13, 22, 31, 40, 49, 58, 69, 78, 87, 96, 105, 114) for x, _, slot in column)
    with pytest.raises(ValueError, match="does not fit"):
        array_bels(12, 13)
    # a netlist as Yosys writes it: the constraint lands on each PE's multiplier, nothing else
    cells = {f"board.accel.engine.array.pe_{i}_{j}.prod_MULT18X18D_P0": {"type": "MULT18X18D", "attributes": {}}
             for i in range(2) for j in range(2)}
    cells["board.accel.engine.requant.prod_MULT18X18D_P0"] = {"type": "MULT18X18D", "attributes": {}}
    netlist = {"modules": {"ambert": {"cells": cells}}}
    assert constrain_array(netlist, 2, 2) == 4
    assert cells["board.accel.engine.array.pe_1_0.prod_MULT18X18D_P0"]["attributes"]["BEL"] == array_bels(2, 2)[1, 0]
    assert "BEL" not in cells["board.accel.engine.requant.prod_MULT18X18D_P0"]["attributes"]
    with pytest.raises(ValueError, match="has 4 PE multipliers, not 9"):
        constrain_array(netlist, 3, 3)
    with pytest.raises(ValueError, match="size 'small' asks for the DSP layout, which is an ECP5's"):
        Board(name="x", platform=object, family="ice40", clock_hz=60e6, baud=3_000_000,
              sizes=(Size("small", AcceleratorConfig(), dsp_layout=True),))


def test_a_size_may_run_at_its_own_clock():
    """Each clock at least 4 cycles a bit of the baud rate like the board's (a fraction where the baud rate
    does not divide it)."""
    config = AcceleratorConfig(DeviceShape(lanes=4, banks=4, bank_words=1024, acc_depth=128))

    def board(clock_hz):
        return Board(name="x", platform=object, family="ecp5", clock_hz=60e6, baud=3_000_000,
                     sizes=(Size("small", config, clock_hz=clock_hz), Size("medium", config)))
    assert board(45e6).clock("small") == 45e6 and board(45e6).divisor("small") == 15
    assert board(45e6).clock("medium") == 60e6
    assert board(50e6).divisor("small") == Fraction(50, 3)
    with pytest.raises(ValueError, match="3000000 baud is 3.00 cycles a bit of the 9.0 MHz clock"):
        board(9e6)


def test_a_size_may_name_its_placement_seed():
    config = AcceleratorConfig(DeviceShape(lanes=4, banks=4, bank_words=1024, acc_depth=128))
    board = Board(name="x", platform=object, family="ecp5", clock_hz=60e6, baud=3_000_000,
                  sizes=(Size("small", config), Size("target", config, seed=2)))
    assert board.seed("target") == 2 and board.seed("small") == 1
    assert get_board("ulx3s").seed("target") == 4
    with pytest.raises(ValueError, match="seed must be a positive integer, not 0"):
        Size("huge", config, seed=0)
    with pytest.raises(ValueError, match="sizes named twice"):
        Board(name="x", platform=object, family="ecp5", clock_hz=60e6, baud=3_000_000,
              sizes=(Size("small", config), Size("small", config)))


def test_the_arrays_registered_weight_writes_stay_one_copy_a_column_through_yosys(tmp_path):
    """SystolicArray(write_latency=1) copies each row's write enable and the bank once a column; the
    copies have the same inputs, so Yosys' opt_merge makes them one register again unless the build's
    script marks them keep. 3 x 3: 9 enables and 3 banks kept; without the script, 3 and 1 (counted as the
    cells that drive the wires marked as copies), besides the 3 columns' weight bytes (marked so that
    another copy of the word, the engine's for its parameters, is not merged into them) and the PEs' 9
    bank-select registers (the same bit wherever it is as many cycles from the input: without the script
    Yosys leaves 6 of them, one PE then taking another's)."""
    from amaranth.back import rtlil
    from ambert.boards.build import KEEP_REPLICAS, _tool
    from ambert.hw.array import SystolicArray
    (tmp_path / "array.il").write_text(rtlil.convert(SystolicArray(3, 3, write_latency=1)))
    REGISTERS = "a:ambert_replica %ci1 c:* %i"
    counts = []
    for script in (KEEP_REPLICAS, ""):
        cmd = f"read_rtlil array.il; {script or 'proc'}; flatten; opt; tee -o count.txt select -count {REGISTERS}"
        run = subprocess.run([_tool("YOSYS"), "-q", "-p", cmd], cwd=tmp_path, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        counts.append(int(re.search(r"(\d+) objects", (tmp_path / "count.txt").read_text()).group(1)))
    assert counts == [12 + 3 + 9, 4 + 3 + 6]


@pytest.mark.parametrize("size", ["small", "medium"])
def test_the_ulx3s_configurations_synthesize_into_the_ecp5(tmp_path, size):
    """Yosys only (~40 s each; place and route: `make bitstream BOARD=ulx3s SIZE=...`, minutes to an hour).
    The medium size is here because Yosys 0.70's ABC9 step once crashed on it (an assertion in
    reintegration) while the small one synthesized."""
    from ambert.boards.build import build
    report = build("ulx3s", size, out=tmp_path, synth_only=True)
    assert report["status"] == "synthesized", report.get("error")
    cells = report["cells"]
    lanes = get_board("ulx3s").config(size).shape.lanes
    assert lanes * lanes <= cells["MULT18X18D"] <= 156          # every PE in a DSP block, within the 85F's
    assert cells["LUT4"] <= 83640 and cells["DP16KD"] <= 208 and cells["TRELLIS_FF"] <= 83640
    assert json.loads((tmp_path / f"ulx3s-{size}" / "report.json").read_text())["cells"] == cells


def test_the_icebreaker_builds_and_meets_timing(tmp_path):
    """The full build of the smallest iCEBreaker configuration, as `make bitstream BOARD=icebreaker` runs
    it (~1.5 min: the UP5K is 92% full, and nextpnr works for its placement). The report has the logic
    cells, block RAMs and DSP blocks used and available and the clock's Fmax against the 30 MHz the board
    file declares (made by the PLL from the 12 MHz oscillator)."""
    from ambert.boards.build import build
    report = build("icebreaker", "small", out=tmp_path)
    assert report["status"] == "pass", report.get("error")
    assert report["timing_met"] and report["bitstream"] and Path(report["bitstream"]).stat().st_size > 100_000
    use = report["utilization"]
    assert use["ICESTORM_LC"]["available"] == 5280 and use["ICESTORM_RAM"]["available"] == 30
    assert use["ICESTORM_LC"]["used"] <= 5280 and use["ICESTORM_RAM"]["used"] <= 30
    assert use["ICESTORM_DSP"] == {"used": 8, "available": 8}        # the array's 16 products, two a block


def test_a_build_past_its_time_limit_stops_and_says_so(tmp_path, capsys):
    """nextpnr's router never gives up on a design it cannot route; ``--time-limit`` stops any tool that
    runs longer (here Yosys, 14 s on the iCEBreaker, after 2) and the build fails saying so."""
    from ambert.boards.build import main
    assert main(["icebreaker", "--out", str(tmp_path), "--time-limit", "2"]) == 2
    report = json.loads((tmp_path / "icebreaker-small" / "report.json").read_text())
    assert report["status"] == "failed" and report["bitstream"] is None
    assert re.fullmatch(r"synthesis \(yosys\) stopped after \d s, the time limit", report["error"])
    assert "STOPPED (time limit)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["icebreaker", "--out", str(tmp_path), "--time-limit", "0"])
    assert "the time limit must be a positive number of seconds, not 0.0" in capsys.readouterr().err


def test_the_progress_line_shows_the_routers_last_iteration(tmp_path):
    from ambert.boards.build import _router_progress
    assert _router_progress(tmp_path) == ""
    (tmp_path / "ambert.tim").write_text("Info: Running router2...\n" + "".join(
        f"Info:     iter={k} wires=5{k:05d} overused={3000 - k} overuse={3001 - k} archfail=NA\n" for k in (1, 2, 60)))
    assert _router_progress(tmp_path) == " (router iteration 60: 2940 wires overused)"


def test_programming_without_a_bitstream_or_a_programmer_says_what_to_do(tmp_path, monkeypatch, capsys):
    from ambert.boards.program import main
    assert main(["ulx3s", "--out", str(tmp_path)]) == 2
    assert "run `make bitstream BOARD=ulx3s SIZE=small` first" in capsys.readouterr().err
    (tmp_path / "ulx3s-small").mkdir()
    (tmp_path / "ulx3s-small" / "ambert.bit").write_bytes(b"\0")
    monkeypatch.setenv("PATH", str(tmp_path))                  # no openFPGALoader here
    assert main(["ulx3s", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "openFPGALoader is not installed" in err and "openFPGALoader --board ulx3s" in err


def _check_minilm(sim, minilm):
    """Real data on the netlist too: a slice of MiniLM's layer-0 Q projection (its first 48 inputs — the
    iCEBreaker's 256-word banks hold neither a 384-deep weight column nor the activations' k-tiles of one
    sentence at that depth — and 16 output channels)."""
    from ambert.sw.gemm_cases import minilm_case, reference
    from ambert.sw.compiler.gemm import gemm_program
    case = minilm_case(minilm, 16, 48)
    prog, decode = gemm_program(sim.config.shape, *case, Mode.INT8)
    got, status = decode(sim.run(prog.words, prog.expect).answers)
    assert parse_status(status) == Error(0)
    assert np.array_equal(got, reference(*case, Mode.INT8))


def test_the_icebreaker_netlist_computes_what_the_design_does(tmp_path, minilm):
    """Post-synthesis: the smallest iCEBreaker configuration as its board build maps it to iCE40 cells
    (LUTs, carries, flip-flops, block RAMs, the array's products in SB_MAC16s), simulated with Yosys' cell
    models, == the integer reference on GEMMs of every mode."""
    from ambert.boards.postsynth import CASES, check, netlist_sim
    sim = netlist_sim("icebreaker", "small", out=tmp_path)
    assert check(sim) == [(shape, mode, True) for shape, mode in CASES]
    _check_minilm(sim, minilm)
    # the 16 products in the 8 DSP blocks, each still two 8 x 8 multiplies (Yosys' DSP pass, which
    # would rewrite them as 16 x 16 multiply-adds, did not run)
    netlist = (tmp_path / "icebreaker-small" / "netlist.v").read_text()
    assert netlist.count("SB_MAC16 #(") == 8
    assert len(re.findall(r"\.MODE_8x8\((?:32'd1|1'h1)\)", netlist)) == 8


def test_the_ulx3s_netlist_computes_what_the_design_does(tmp_path, minilm):
    """Post-synthesis on the ECP5: LUTs, carries, flip-flops, the DSP blocks' multiplies and the block RAMs
    as Yosys maps them (the last two with boards/ecp5_models.v), == the integer reference."""
    from ambert.boards.postsynth import CASES, check, netlist_sim
    sim = netlist_sim("ulx3s", "small", out=tmp_path)
    assert check(sim) == [(shape, mode, True) for shape, mode in CASES]
    _check_minilm(sim, minilm)
    netlist = (tmp_path / "ulx3s-small" / "netlist.v").read_text()
    assert "DP16KD" in netlist                                    # the model was exercised
    # the pool's block RAMs with their output registers (hw.bufpool.registered_bram): 4 banks of 4
    # DP16KDs of 9 bits for a 32-bit word
    assert len(re.findall(r'\.REGMODE_B\("OUTREG"\)', netlist)) == 4 * 4
    # every multiply in a DSP block with its registers (hw.mac.registered_product, product_latency 2):
    # the PEs' 16, the requantizer's lane of 4 partial products, the sequencer's one
    cells = re.findall(r"^\s*MULT18X18D (#\(.*?\)\s*)?\S+\s+\(", netlist, flags=re.S | re.M)
    registered = [p for p in cells if all(f'.REG_{r}_CLK("CLK0")' in p for r in ("INPUTA", "INPUTB", "OUTPUT"))]
    assert len(registered) == len(cells) == 16 + 4 + 1


def test_postsynthesis_simulation_names_the_sizes_a_board_has(capsys):
    from ambert.boards.postsynth import main
    assert main(["icebreaker", "--size", "huge"]) == 2
    assert "icebreaker has sizes small, target, not 'huge'" in capsys.readouterr().err
