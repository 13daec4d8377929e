"""What every section of the report shares: the run's settings, the evaluation sentences, the FP32
teacher and its tokenizer, and the quantized model (made once, by the quantization section)."""

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Settings", "Context"]

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    """How much each section measures. The full run is sized to finish within 30 minutes on two cores;
    ``quick()`` keeps every section and every code path but shrinks the counts, for CI."""
    sentences: int = 0                   # evaluation sentences (0: all of tests/fixtures/sentences.txt)
    reps: int = 5                        # interleaved timing runs at batch 32 (four times that at batch 1)
    seq: int = 128                       # tokens per sequence wherever a device runs
    fractions: tuple = (0.0, 0.25, 0.4, 0.5, 0.6)      # of encoder MACs pruned
    distill_fraction: float = 0.4
    distill_steps: int = 300
    distill_batch: int = 32
    workers: tuple = (1, 2, 4)           # `ambert serve --workers N` for the PSS figures
    ranks: tuple = (1, 2, 4)
    data_batch: int = 8
    micro_batches: int = 8
    pipeline_layers: int = 12            # the pipeline's model: MiniLM's layers repeated to this depth
    gemm_models: tuple = ("MiniLM", "bert-base")
    board_seq: int = 32                  # tokens of the whole-model run on each board configuration (the
                                         # iCEBreaker's 3 KiB pool makes 128 a 20-minute simulation)

    @classmethod
    def quick(cls):
        return cls(sentences=24, reps=1, seq=32, fractions=(0.0, 0.4), distill_steps=3, distill_batch=4,
                   workers=(1, 2), ranks=(1, 2), data_batch=2, micro_batches=4, pipeline_layers=6,
                   gemm_models=("MiniLM",), board_seq=16)


@dataclass
class Context:
    settings: Settings
    out: Path = None                     # where the page and its figures go
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ambert-report-")))    # scratch
    sentences: list = None
    teacher: object = None
    tokenizer: object = None
    qm: object = None                    # the bundled MiniLM quantized (set by the quantization section)
    artifact: Path = None                # ... and saved, as a user's `ambert quantize` would
    fidelity: dict = field(default_factory=dict)    # contender -> (mean cos, min cos, Spearman)

    def load(self):
        from ambert.sw.quant.hf import load_bert, load_tokenizer
        from ambert.sw.quant.quantize import read_sentences
        sentences = read_sentences(ROOT / "tests" / "fixtures" / "sentences.txt")
        self.sentences = sentences[:self.settings.sentences] if self.settings.sentences else sentences
        self.teacher, self.tokenizer = load_bert().eval(), load_tokenizer()
        return self

    def close(self):
        import shutil
        shutil.rmtree(self.work, ignore_errors=True)

    def batch(self, n, seq=None):
        """``n`` copies of one long sentence, padded and cut to ``seq`` tokens."""
        text = " ".join(self.sentences[:12])
        return dict(self.tokenizer([text] * n, padding="max_length", max_length=seq or self.settings.seq,
                                   truncation=True, return_tensors="pt"))
