import os

import pytest
import torch
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")

# Fuzz tests (hypothesis, and the seeded artifact fuzzer) run a bounded number of examples in `make test`;
# AMBERT_FUZZ=<factor> runs that many times more. Examples are drawn the same way on every run
# (derandomize), so CI is reproducible; a failure prints the example that found it.
FUZZ = float(os.environ.get("AMBERT_FUZZ", "1"))


def fuzz_examples(n):
    return max(1, round(n * FUZZ))


settings.register_profile("ambert", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("ambert")

_BUILT = {}


def once(key, build):
    """``build()``'s result, built once per test run: the fixtures below are module-scoped (so module
    fixtures can use them) and share one model across every module."""
    if key not in _BUILT:
        _BUILT[key] = build()
    return _BUILT[key]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch here)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def minilm():
    """The bundled all-MiniLM-L6-v2, quantized once per run: (QuantizedBert, FP32 model, tokenizer)."""
    from ambert.sw.quant.quantize import quantize_pretrained
    return once("minilm", lambda: quantize_pretrained(progress=False))


@pytest.fixture(scope="module")
def eval_sentences():
    from ambert.sw.quant.quantize import read_sentences
    return read_sentences(os.path.join(FIXTURES, "sentences.txt"))


def simulate(dut, bench):
    """Run ``bench`` (an async testbench) on ``dut`` in Amaranth's simulator, one clock."""
    from amaranth.sim import Simulator
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


WORDS = ("the a cat dog sat on mat rug market fell rose bank rates high low what is my name how do "
         "i reset password quick brown fox jumps over lazy river tree house car blue red green").split()


def make_tiny_bert(folder, hidden=32, heads=4, layers=2, ffn=64, positions=24, seed=0):
    """Write a small random BertModel with a word-level tokenizer to ``folder``; return the folder."""
    from transformers import BertConfig, BertModel, BertTokenizer
    torch.manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    vocab_file = os.path.join(folder, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizer(vocab_file).save_pretrained(folder)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_attention_heads=heads,
                     num_hidden_layers=layers, intermediate_size=ffn, max_position_embeddings=positions)
    model = BertModel(cfg).eval()
    with torch.no_grad():     # random init has near-constant LayerNorms; give them some spread
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.uniform_(0.5, 2.0)
            elif "LayerNorm.bias" in name or name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    return once("tiny_bert_dir", lambda: make_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert"))))


CALIB = [" ".join(WORDS[i:i + 7]) for i in range(0, len(WORDS) - 7, 3)]


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    """A tiny random BERT quantized on a few sentences: (QuantizedBert, FP32 model, tokenizer)."""
    from ambert.sw.quant.quantize import quantize_pretrained
    return once("tiny", lambda: quantize_pretrained(tiny_bert_dir, CALIB, progress=False))


@pytest.fixture(scope="module")
def pruned(tiny_bert_dir):
    """The tiny BERT (4 heads of 8, FFN 64) with 45% of its encoder MACs removed, neurons in blocks of 4
    (the SMALL accelerator's lanes)."""
    from ambert.sw.quant.prune import prune_pretrained
    return once("pruned", lambda: prune_pretrained(0.45, model_dir=tiny_bert_dir, calibration=CALIB, lanes=4,
                                                   progress=False))

