"""The runtime: the simulated accelerator runs the quantized model bit-exactly; operations it cannot take,
and faults while it runs, fall back to the CPU reference with a warning and the same bits."""

import subprocess
import warnings

import pytest
import torch

import ambert

from ambert.hw.config import AcceleratorConfig
from ambert.proto.isa import STATUS, STATUS_MAGIC, Counters, DeviceShape, Error
from ambert.sim.fastsim import FastSim, SimHang
from ambert.sw.quant.hf import encode
from ambert.sw.runtime import DeviceError, OffloadedBert, Runner, offload
from ambert.sw.runtime.cpu import CpuDevice
from ambert.sw.runtime.sim import SimDevice

SMALL = AcceleratorConfig(DeviceShape(lanes=4, banks=4, bank_words=1024, acc_depth=128))   # built by the top tests too
TINY_POOL = AcceleratorConfig(DeviceShape(lanes=4, banks=3, bank_words=64, acc_depth=32))
NO_POOL = AcceleratorConfig(DeviceShape(lanes=4, banks=3, bank_words=16, acc_depth=32))   # not one weight column


def reference(qm, enc):
    return qm.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])


def run(qm, model, devices, enc):
    mod = OffloadedBert(qm, model.config, devices)
    return mod(**enc).last_hidden_state, mod


def test_minilm_on_the_simulated_accelerator_is_bit_exact(minilm):
    qm, model, tok = minilm
    enc = encode(tok, ["The quick brown fox jumps over the lazy dog.", "Hello there!"])
    mod = ambert.offload(model, device="sim", quantized=qm)          # the documented import name
    out = mod(**enc).last_hidden_state
    assert torch.equal(out, reference(qm, enc))
    stats = mod.last_stats
    assert stats.ops == {"sim": 6 * qm.config["layers"]}     # every GEMM ran on the device (Q, K, V as one)
    assert stats.busy_cycles > 0 and stats.cycles > stats.busy_cycles and 0 < stats.efficiency <= 1


def _tiles_zeroed(qm, fraction, lanes=16):
    """``qm`` with the ``fraction`` of each weight matrix's ``lanes x lanes`` tiles of least magnitude zeroed
    (a real model's layers, tile-pruned)."""
    import dataclasses
    layers = []
    for p in qm.layers:
        zeroed = {}
        for name in ("wq", "wk", "wv", "wo", "w1", "w2"):
            w = getattr(p, name).clone()
            n, k = w.shape
            size = w.abs().to(torch.int32).reshape(n // lanes, lanes, k // lanes, lanes).sum(dim=(1, 3))
            for flat in torch.argsort(size.flatten())[:int(fraction * size.numel())].tolist():
                t, j = divmod(flat, size.shape[1])
                w[t * lanes:(t + 1) * lanes, j * lanes:(j + 1) * lanes] = 0
            zeroed[name] = w
        layers.append(dataclasses.replace(p, **zeroed))
    return dataclasses.replace(qm, layers=layers)


def test_minilm_with_zero_weight_tiles_skips_them_on_the_device_bit_exact(minilm):
    """MiniLM's layers with 40% of every weight matrix's 16x16 tiles zeroed: the device runs them as MATMUL
    chains over the non-zero tiles, `==` the reference, in fewer cycles and host words than dense."""
    qm, model, tok = minilm
    pruned = _tiles_zeroed(qm, 0.4)
    enc = encode(tok, ["The quick brown fox jumps over the lazy dog."])
    runs = {}
    for name, q in (("dense", qm), ("pruned", pruned)):
        out, mod = run(q, model, [SimDevice(), CpuDevice()], enc)
        assert torch.equal(out, reference(q, enc)), name
        assert mod.last_stats.ops == {"sim": 6 * qm.config["layers"]}
        runs[name] = mod.last_stats
    assert runs["pruned"].cycles < runs["dense"].cycles and runs["pruned"].host_words < runs["dense"].host_words


def test_minilm_through_a_narrow_requantizer_is_bit_exact(minilm):
    """The ULX3S target's configuration: 12x12, the requantizer two columns a cycle (last k-tiles paced)."""
    from ambert.boards import get_board
    config = get_board("ulx3s").config("target")
    assert config.impl.requant_lanes < config.shape.lanes
    qm, model, tok = minilm
    enc = encode(tok, ["The quick brown fox jumps over the lazy dog.", "Hello there!"])
    out, mod = run(qm, model, [SimDevice(config), CpuDevice()], enc)
    assert torch.equal(out, reference(qm, enc))
    assert mod.last_stats.ops == {"sim": 6 * qm.config["layers"]}


def test_gemms_deeper_than_a_bank_run_on_the_device_split_over_k(tiny):
    """A pool too small for a GEMM's whole depth (64-word banks: the FFN's K = 64 weight column and its
    parameters need 73) runs it as int32 partial GEMMs over K on the device, summed and requantized on the
    host: nothing falls back, and the bits are the reference's."""
    qm, model, tok = tiny
    enc = encode(tok, ["the cat sat on the mat", "what is my name"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # no fallback
        out, mod = run(qm, model, [SimDevice(TINY_POOL), CpuDevice()], enc)
    assert torch.equal(out, reference(qm, enc))
    assert mod.last_stats.ops == {"sim": 6 * qm.config["layers"]}


def test_minilm_on_the_icebreaker_configuration_is_bit_exact(minilm):
    """Real data through the iCEBreaker's configuration (its board file) on the simulated device: every
    GEMM deeper than its 256-word banks split over K, the bit-serial requantizer, the compact array, one
    command at a time; nothing falls back."""
    from ambert.boards import get_board
    qm, model, tok = minilm
    enc = encode(tok, ["The cat sat on the mat."])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # no fallback
        out, mod = run(qm, model, [SimDevice(get_board("icebreaker").config("small")), CpuDevice()], enc)
    assert torch.equal(out, reference(qm, enc))
    assert mod.last_stats.ops == {"sim": 6 * qm.config["layers"]}


def test_operations_too_large_for_the_pool_fall_back(tiny):
    qm, model, tok = tiny
    enc = encode(tok, ["the cat sat on the mat", "what is my name"])
    with pytest.warns(RuntimeWarning, match="cannot take .* not even one k-tile of weights fits half a bank"):
        out, mod = run(qm, model, [SimDevice(NO_POOL), CpuDevice()], enc)
    assert torch.equal(out, reference(qm, enc))
    assert mod.last_stats.ops == {"cpu": 6 * qm.config["layers"]}


class FaultySim:
    """A FastSim that fails on chosen calls: a hang, a dead process, or an error status in its answer."""

    def __init__(self, config, faults):
        self.real = FastSim(config)
        self.config = config
        self.faults = dict(faults)
        self.calls = 0

    def run(self, words, expect, **kw):
        self.calls += 1
        fault = self.faults.get(self.calls)
        if fault == "hang":
            raise SimHang("device went idle (injected)")
        if fault == "dead":
            raise subprocess.CalledProcessError(-9, "Vtop")
        result = self.real.run(words, expect, **kw)
        if fault == "status":
            # the GEMM's SYNC now reports ADDRESS
            result.answers[-1 - Counters.WORDS] = STATUS.pack(errors=Error.ADDRESS, magic=STATUS_MAGIC)
        return result


@pytest.mark.parametrize("fault", ["hang", "dead", "status"])
def test_device_faults_mid_run_fall_back_with_the_same_bits(tiny, fault):
    """A program that fails twice running (its first try and the retry after the reset) goes to the CPU."""
    qm, model, tok = tiny
    enc = encode(tok, ["the quick brown fox", "jumps over the lazy dog"])
    sim = SimDevice(SMALL, sim=FaultySim(SMALL, {3: fault, 4: fault, 9: fault, 10: fault}))
    with pytest.warns(RuntimeWarning, match="failed"):
        out, mod = run(qm, model, [sim, CpuDevice()], enc)
    assert torch.equal(out, reference(qm, enc))
    assert mod.last_stats.ops["cpu"] == 2


@pytest.mark.parametrize("fault", ["hang", "dead", "status"])
def test_a_single_fault_is_recovered_on_the_device(tiny, fault):
    """One failed program: the device is reset and the GEMM compiled again for the empty pool and run
    there — nothing falls back, nothing is lost, the bits are the reference's."""
    _all_on_the_device(tiny, SimDevice(SMALL, sim=FaultySim(SMALL, {3: fault, 9: fault})), recovered=2)


def _all_on_the_device(tiny, sim, recovered):
    """A forward on ``sim`` (the CPU behind it): no warning, every GEMM on the device, `==`."""
    qm, model, tok = tiny
    enc = encode(tok, ["the quick brown fox", "jumps over the lazy dog"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, mod = run(qm, model, [sim, CpuDevice()], enc)
    assert torch.equal(out, reference(qm, enc))
    assert mod.last_stats.ops == {"sim": 6 * qm.config["layers"]} and mod.last_stats.recovered == recovered


def test_a_truncated_stream_does_not_cost_the_next_gemm(tiny):
    """A stream cut off mid-command (a LOAD announced with 500 words and given 7) leaves the device waiting
    for the rest; the next program finds it out of step, and the reset and retry bring every GEMM of the
    forward back onto the device, `==` the reference."""
    from ambert.proto.isa import Opcode, header
    sim = SimDevice(SMALL)
    sim.sim.run([header(Opcode.LOAD, 500), 0] + [0x01020304] * 7, expect=0)
    _all_on_the_device(tiny, sim, recovered=1)


class WholeLayerDevice(CpuDevice):
    """A backend that runs whole layers itself and counts its own matmuls (as the GPU backend does)."""
    name = "whole"

    def run_layer(self, p, x8, x16, mask, matmul=None, next_p=None):
        from ambert.sw.quant.ref import ref_layer, ref_matmul

        def counted(*args):
            self.stats.ops[self.name] = self.stats.ops.get(self.name, 0) + 1
            return ref_matmul(*args)
        return ref_layer(x8, x16, p, mask, matmul=counted)


def test_ops_a_device_counts_itself_reach_the_stats(tiny):
    qm, model, tok = tiny
    enc = encode(tok, ["the cat sat on the mat"])
    out, mod = run(qm, model, [WholeLayerDevice(), CpuDevice()], enc)
    assert torch.equal(out, reference(qm, enc))
    assert mod.last_stats.ops == {"whole": 8 * qm.config["layers"]}    # none lost, none given to the CPU


def test_a_lone_device_that_fails_raises(tiny):
    qm, _, tok = tiny
    enc = encode(tok, ["the cat"])
    sim = SimDevice(SMALL, sim=FaultySim(SMALL, {1: "hang", 2: "hang"}))       # the retry fails too
    runner = Runner([sim])
    with pytest.raises(DeviceError, match="injected"):
        qm.forward_int(enc["input_ids"], enc["attention_mask"], layer_fn=runner.layer_fn(qm.layers))


def test_drop_in_under_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer
    from ambert.sw.quant.hf import bundled_model_dir
    qm, model, tok = minilm
    st = SentenceTransformer(str(bundled_model_dir()), device="cpu")
    fp32 = st.encode(["A man is playing a guitar.", "Someone plays an instrument."], convert_to_tensor=True)
    # sentence-transformers 6 keeps the Hugging Face model in `.model` (`.auto_model` is a read-only alias)
    st[0].model = offload(st[0].model, device="cpu", quantized=qm)
    tokens = st.encode(["A man is playing a guitar."], output_value="token_embeddings")[0]
    enc = encode(tok, ["A man is playing a guitar."])
    assert torch.equal(tokens, reference(qm, enc)[0])
    emb = st.encode(["A man is playing a guitar.", "Someone plays an instrument."], convert_to_tensor=True)
    assert float(torch.nn.functional.cosine_similarity(emb, fp32).min()) > 0.99    # measured fidelity


def test_unknown_device():
    from ambert.sw.runtime import get_device
    with pytest.raises(ValueError, match="unknown device"):
        get_device("tpu")


def test_waveform_dump(tiny, tmp_path):
    qm, _, tok = tiny
    enc = encode(tok, ["the cat"])
    out = tmp_path / "run.vcd"
    sim = SimDevice(SMALL, waves=out)
    runner = Runner([sim])
    x16 = qm.forward_int(enc["input_ids"], enc["attention_mask"], layer_fn=runner.layer_fn(qm.layers))
    sim.sim.close()
    assert torch.equal(x16, qm.forward_int(enc["input_ids"], enc["attention_mask"]))
    head = out.read_text()[:4000]
    assert "$timescale" in head and "$var" in head and "clk" in head


def test_weights_stay_on_the_device_across_calls_and_models(tiny, pruned):
    """Two models sharing one simulated 16x16 device (whose pool holds both), each asked twice in turn: the
    repeat of a request sends fewer words over the host link (its weights found resident), and every
    answer is `==` its reference."""
    sim = SimDevice()
    sent = []
    for qm, model, tok in (tiny, pruned, tiny, pruned):
        enc = encode(tok, ["the cat sat on the mat", "what is my name"])
        out, mod = run(qm, model, [sim, CpuDevice()], enc)
        assert torch.equal(out, reference(qm, enc))
        assert mod.last_stats.ops == {"sim": 6 * qm.config["layers"]}
        sent.append(mod.last_stats.host_words)
    assert sent[2] < sent[0] and sent[3] < sent[1], sent
