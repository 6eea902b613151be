from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

from trtforge.errors import CalibrationError, InputError
from trtforge.textdata import build_samples, prompt_prefix, read_documents, split_sentences

from ..conftest import DATA  # noqa: TID252


@pytest.fixture(scope="module")
def tok(tiny_model):
    return transformers.AutoTokenizer.from_pretrained(str(tiny_model("llama")))


def _build(tok, paths, **kw):
    args = dict(mode="windows", num_samples=8, seq_len=32, seed=0, max_positions=256, vocab_size=1000)
    args.update(kw)
    return build_samples(paths, tok, **args)


def test_windows_are_deterministic_and_full_length(tok):
    a = _build(tok, [DATA / "calib-apache-2.0.txt"])
    b = _build(tok, [DATA / "calib-apache-2.0.txt"])
    c = _build(tok, [DATA / "calib-apache-2.0.txt"], seed=1)
    assert len(a.ids) == 8 and all(len(x) == 32 for x in a.ids)
    assert a.sha256 == b.sha256 and a.sha256 != c.sha256
    assert a.describe()["num_tokens"] == 256


def test_too_little_text_warns_and_uses_what_there_is(tok, tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("Only a few words of text are here, and then the file ends. " * 4)
    s = _build(tok, [p], num_samples=50, seq_len=16)
    assert 0 < len(s.ids) < 50
    assert "instead of 50" in s.notes[0]
    with pytest.raises(CalibrationError, match="fewer than one sample"):
        _build(tok, [p], seq_len=10_000, max_positions=100_000)


def test_seq_len_beyond_model_maximum_is_clamped_with_a_note(tok):
    s = _build(tok, [DATA / "calib-mpl-lgpl.txt"], seq_len=512, max_positions=64)
    assert all(len(x) == 64 for x in s.ids)
    assert any("exceeds the model's 64 positions" in n for n in s.notes)


def test_sentences_mode_adds_special_tokens(tiny_model):
    bt = transformers.AutoTokenizer.from_pretrained(str(tiny_model("bert")))
    s = _build(bt, [DATA / "calib-apache-2.0.txt"], mode="sentences", num_samples=20, seq_len=64)
    assert len(s.ids) == 20
    assert all(x[0] == bt.cls_token_id and x[-1] == bt.sep_token_id for x in s.ids)
    assert s.token_type_ids is not None and len(s.token_type_ids) == 20


def test_jsonl_field_and_errors(tok, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"content": t}) for t in split_sentences((DATA / "calib-apache-2.0.txt").read_text())))
    s = _build(tok, [p], text_field="content")
    assert len(s.ids) == 8
    with pytest.raises(InputError, match=r"d.jsonl:1 has no field 'text' \(has: content\)"):
        _build(tok, [p])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine line of text here"}\n{not json}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2 is not valid JSON"):
        read_documents([bad])


def test_npz(tok, tmp_path):
    ids = np.random.default_rng(0).integers(0, 900, (6, 20))
    np.savez(tmp_path / "t.npz", input_ids=ids)
    s = _build(tok, [tmp_path / "t.npz"], num_samples=4)
    assert len(s.ids) == 4 and s.mode == "npz"
    np.savez(tmp_path / "big.npz", input_ids=ids + 5000)
    with pytest.raises(InputError, match="outside the vocabulary"):
        _build(tok, [tmp_path / "big.npz"])
    np.savez(tmp_path / "none.npz", tokens=ids)
    with pytest.raises(InputError, match="no 'input_ids'"):
        _build(tok, [tmp_path / "none.npz"])


@pytest.mark.parametrize("content,match", [(b"", "is empty"), (b"   \n\n", "is empty"), (b"caf\xe9 au lait", "not UTF-8 .*0xe9 at offset 3")])
def test_bad_text_files(tok, tmp_path, content, match):
    p = tmp_path / "x.txt"
    p.write_bytes(content)
    with pytest.raises(InputError, match=match):
        _build(tok, [p])


def test_missing_file(tok, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        _build(tok, [tmp_path / "nope.txt"])


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be", "utf-32", "utf-8-sig"])
def test_text_with_a_byte_order_mark_is_decoded_by_it(tmp_path, codec):
    """Issue 12: Windows editors save UTF-16 with a BOM; it is text, not a Latin-1 problem."""
    text = "Première ligne de texte.\nZweite Zeile: Grüße."
    data = text.encode(codec)
    if codec == "utf-16-be":
        data = b"\xfe\xff" + data
    p = tmp_path / "bom.txt"
    p.write_bytes(data)
    assert read_documents([p])[0].text == text


def test_broken_utf16_names_the_encoding_not_latin1(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"\xff\xfe" + "ok".encode("utf-16-le") + b"\x00\xd8")  # a lone surrogate
    with pytest.raises(InputError) as e:
        read_documents([p])
    line = e.value.one_line()
    assert "UTF-16 byte-order mark" in line and "iconv -f utf-16 -t utf-8" in line and "latin1" not in line


def test_jsonl_without_the_field_gives_the_key_each_command_accepts(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"content": "Some text here."}) + "\n")
    with pytest.raises(InputError) as e:
        read_documents([p])
    line = e.value.one_line()
    assert "d.jsonl:1 has no field 'text' (has: content)" in line
    # quantize takes recipe fields with --set; run takes [calibration] keys
    assert "--set text_field=KEY" in line and "--set calibration.text_field=KEY" in line
    assert "calib.text_field" not in line


def test_quantize_output_inside_the_calibration_data_folder_is_refused(exported, tmp_path):
    """Issue 12: a quantized artifact written into the data folder would be read as data next time."""
    from trtforge.calibration import get_preset, quantize

    data = tmp_path / "data"
    data.mkdir()
    (data / "calib.txt").write_text((DATA / "calib-mpl-lgpl.txt").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(InputError, match="inside the calibration data"):
        quantize(exported("llama"), get_preset("int8-sq"), data / "q", calib=[data])
    assert [p.name for p in data.iterdir()] == ["calib.txt"]


def _with_bos(tok):
    """The tiny BPE tokenizer, made to put a BOS before every prompt as Llama's and Gemma's do."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    inner = tok.backend_tokenizer
    bos = inner.token_to_id("<|endoftext|>")
    inner.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<|endoftext|>", eos_token="<|endoftext|>"), bos


def test_windows_start_with_the_prompt_bos_where_the_tokenizer_adds_one(tiny_model):
    plain = transformers.AutoTokenizer.from_pretrained(str(tiny_model("llama")))
    assert prompt_prefix(plain) == []
    bos_tok, bos = _with_bos(transformers.AutoTokenizer.from_pretrained(str(tiny_model("llama"))))
    assert prompt_prefix(bos_tok) == [bos]
    a = _build(plain, [DATA / "calib-apache-2.0.txt"])
    b = _build(bos_tok, [DATA / "calib-apache-2.0.txt"])
    assert all(len(x) == 32 for x in b.ids) and all(int(x[0]) == bos for x in b.ids)
    # the rest of each window is consecutive text of the same stream, one token shorter
    stream = np.concatenate([plain(d.text, add_special_tokens=False)["input_ids"] + [plain.eos_token_id]
                             for d in read_documents([DATA / "calib-apache-2.0.txt"], "text")])
    for x in b.ids:
        body = np.asarray(x[1:])
        assert any(np.array_equal(stream[i:i + 31], body) for i in range(0, len(stream) - 30, 31))
    assert not all(int(x[0]) == bos for x in a.ids)
    assert any("prompt prefix" in n for n in b.notes)
