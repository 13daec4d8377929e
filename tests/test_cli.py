"""The ``ambert`` command end to end on a tiny model, and its refusal of bad input."""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ambert.sw.cli import main
from conftest import fuzz_examples, make_tiny_bert, WORDS


@pytest.fixture(scope="module")
def tiny_artifact(tiny_bert_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    calib = folder / "calib.txt"
    calib.write_text("\n".join(" ".join(WORDS[i:i + 6]) for i in range(0, 30, 3)))
    out = folder / "tiny.safetensors"
    assert main(["quantize", "--model", tiny_bert_dir, "--calibration", str(calib), "-o", str(out), "-q"]) == 0
    return out


def test_quantize_info_run(tiny_artifact, tiny_bert_dir, capsys):
    assert main(["info", str(tiny_artifact)]) == 0
    assert "checksum ok" in capsys.readouterr().out
    assert main(["run", "--artifact", str(tiny_artifact), "--model", tiny_bert_dir, "--device", "cpu",
                 "the cat sat on the mat", "the dog sat on the rug"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("device cpu") and "2 sentences" in out and "1.000" in out


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ambert: error: ")
    return err


def test_sequence_longer_than_the_model(tiny_artifact, tiny_bert_dir, capsys):
    long = " ".join(["cat"] * 40)      # the tiny model has 24 positions
    err = _error(capsys, ["run", "--artifact", str(tiny_artifact), "--model", tiny_bert_dir, long])
    assert "tokens long" in err and "at most 24" in err


def test_empty_sentence(tiny_artifact, tiny_bert_dir, capsys):
    assert "empty" in _error(capsys, ["run", "--artifact", str(tiny_artifact), "--model", tiny_bert_dir, "  "])


def test_not_a_bert(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    err = _error(capsys, ["quantize", "--model", str(tmp_path), "-o", str(tmp_path / "x.safetensors")])
    assert "'gpt2'" in err and "BERT" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_missing_model_folder(tmp_path, capsys):
    assert "does not exist" in _error(capsys, ["quantize", "--model", str(tmp_path / "nowhere")])


def test_folder_without_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "no weights" in _error(capsys, ["quantize", "--model", str(tmp_path)])


def test_broken_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert "not valid JSON" in _error(capsys, ["quantize", "--model", str(tmp_path)])


def test_corrupted_weights(tmp_path, capsys):
    folder = make_tiny_bert(str(tmp_path / "m"))
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "cannot load" in _error(capsys, ["quantize", "--model", folder, "-o", str(tmp_path / "o.st")])
    assert not (tmp_path / "o.st").exists()


def test_corrupted_artifact(tiny_artifact, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(tiny_artifact.read_bytes()[:-10])
    assert "corrupted" in _error(capsys, ["info", str(bad)])


def test_artifact_for_another_tokenizer(minilm, tiny_artifact, capsys):
    err = _error(capsys, ["run", "--artifact", str(tiny_artifact), "hello there"])   # bundled tokenizer
    assert "quantized for" in err


def test_empty_calibration_file(tiny_bert_dir, tmp_path, capsys):
    empty = tmp_path / "c.txt"
    empty.write_text("\n# nothing\n")
    assert "no sentences" in _error(capsys, ["quantize", "--model", tiny_bert_dir, "--calibration", str(empty)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_requested_without_one(tiny_artifact, tiny_bert_dir, capsys):
    err = _error(capsys, ["run", "--artifact", str(tiny_artifact), "--model", tiny_bert_dir,
                          "--device", "gpu", "the cat"])
    assert "no CUDA GPU" in err


def test_wrong_input_dtype(tiny):
    from ambert.sw.quant.model import InputError
    qm = tiny[0]
    with pytest.raises(InputError, match="int64 or int32"):
        qm.forward_int(torch.zeros(1, 3, dtype=torch.float32))
    with pytest.raises(InputError, match="token ids"):
        qm.forward_int(torch.tensor([[0, 1, 10_000]]))
    with pytest.raises(InputError, match="empty"):
        qm.forward_int(torch.zeros(1, 0, dtype=torch.int64))


def test_waves_need_the_simulated_device(tiny_artifact, tiny_bert_dir, tmp_path, capsys):
    err = _error(capsys, ["run", "--artifact", str(tiny_artifact), "--model", tiny_bert_dir, "--device", "cpu",
                          "--waves", str(tmp_path / "w.vcd"), "the cat"])
    assert "--waves needs --device sim" in err


def test_unknown_device_name(tiny_artifact, tiny_bert_dir, capsys):
    err = _error(capsys, ["run", "--artifact", str(tiny_artifact), "--model", tiny_bert_dir, "--device", "tpu",
                          "the cat"])
    assert "unknown device 'tpu'" in err


def test_text_that_is_not_utf8_is_refused_naming_the_argument(tiny_artifact, tiny_bert_dir, tmp_path):
    """Raw bytes on the command line, as a shell passes them: a message naming the argument, no traceback."""
    ambert = Path(sys.executable).with_name("ambert")
    run = subprocess.run([ambert, "run", "--artifact", tiny_artifact, "--model", tiny_bert_dir, "--device", "cpu",
                          b"the cat", b"caf\xe9 \xff\xfe"], capture_output=True, cwd=tmp_path)
    err = run.stderr.decode(errors="replace")
    assert run.returncode == 2 and "Traceback" not in err, err
    assert "ambert: error: sentence argument 2 is not valid UTF-8 text (byte 0xe9 at character 4)" in err


def test_text_that_is_not_utf8_from_python(tiny):
    from ambert.sw.quant.hf import encode
    tok = tiny[2]
    with pytest.raises(ValueError, match="sentence 1 is not valid UTF-8 text"):
        encode(tok, ["the cat", b"caf\xe9".decode("utf-8", "surrogateescape")])
    with pytest.raises(ValueError, match="sentence 0 holds a NUL character"):
        encode(tok, ["the\0cat"])
    with pytest.raises(ValueError, match="sentence 0 is a bytes, not text"):
        encode(tok, [b"the cat"])


@settings(max_examples=fuzz_examples(200))
@given(st.lists(st.one_of(st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape")),
                          st.text(max_size=40)), min_size=1, max_size=3))
def test_fuzz_text_into_the_tokenizer_is_encoded_or_refused_by_name(tiny, sentences):
    """Any text a caller can hand over (arguments as the shell passes bytes, any Unicode): it is encoded,
    or refused with a ValueError naming the sentence — never another exception."""
    from ambert.sw.quant.hf import encode
    try:
        enc = encode(tiny[2], sentences, max_length=24)
    except ValueError as e:
        assert str(e).startswith("sentence "), e
    else:
        assert enc["input_ids"].shape[0] == len(sentences)


@settings(max_examples=fuzz_examples(40))
@given(st.binary(min_size=1, max_size=30))
def test_fuzz_the_command_line_takes_any_bytes_without_a_traceback(tiny_artifact, tiny_bert_dir, raw):
    """``ambert run`` with a sentence of arbitrary bytes, decoded as Python decodes argv: it prints the
    embeddings' similarities (exit 0) or one error line (exit 2)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["run", "--artifact", str(tiny_artifact), "--model", tiny_bert_dir, "--device", "cpu",
                     "the cat", raw.decode("utf-8", "surrogateescape")])
    assert "Traceback" not in err.getvalue()
    if code == 0:
        assert "cosine similarity" in out.getvalue()
    else:
        assert code == 2 and err.getvalue().strip().splitlines()[-1].startswith("ambert: error: "), err.getvalue()


def test_a_calibration_file_that_is_not_utf8_names_the_file_and_line(tiny_bert_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_bytes(b"the cat sat\nthe dog \xff\xfe sat\n")
    err = _error(capsys, ["quantize", "--model", tiny_bert_dir, "--calibration", str(calib)])
    assert f"{calib}, line 2: not valid UTF-8 text (byte 0xff)" in err


def test_a_bad_baud_rate_is_named(tiny_artifact, tiny_bert_dir, capsys):
    err = _error(capsys, ["run", "--artifact", str(tiny_artifact), "--model", tiny_bert_dir, "--device",
                          "board:/dev/ttyUSB0@abc", "the cat"])
    assert "the baud rate in 'board:/dev/ttyUSB0@abc' must be a positive whole number" in err


def test_a_folder_given_as_the_artifact_is_named(tmp_path, capsys):
    err = _error(capsys, ["info", str(tmp_path)])
    assert f"quantized model {tmp_path} is a folder" in err
