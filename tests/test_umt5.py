"""Wan's text pieces without transformers: our UMT5 encoder against transformers'
UMT5EncoderModel (same checkpoint, saved by transformers and read by our loader; same
states in fp32, bf16 and fp16, with and without padding; configs it does not cover go to
transformers), and the tokenizer.json tokenizer against AutoTokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import UMT5Config, UMT5EncoderModel

from fastvideo.models import umt5
from fastvideo.models.text_encoders import load_text_encoder

CONFIG = dict(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
              relative_attention_num_buckets=8, relative_attention_max_distance=16)  # fmt: skip


def _reference(tmp_path, **overrides):
    torch.manual_seed(0)
    ref = UMT5EncoderModel(UMT5Config(**{**CONFIG, **overrides})).eval()
    with torch.no_grad():  # random norms and biases: a path that skips one shows
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    ref.save_pretrained(str(tmp_path / "te"))
    return ref


def _inputs(length: int = 40):
    ids = torch.randint(1, CONFIG["vocab_size"], (3, length))
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, 9:] = 0  # padded prompts (longer than max_distance: the log buckets are used)
    mask[2, 30:] = 0
    return ids, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_states_equal_transformers(tmp_path, dtype):
    ref = _reference(tmp_path)
    ours = load_text_encoder(tmp_path / "te", "UMT5EncoderModel", dtype, torch.device("cpu"))
    assert isinstance(ours, umt5.UMT5Encoder)
    ref_cast = UMT5EncoderModel.from_pretrained(str(tmp_path / "te"), dtype=dtype).eval()
    wo = ours.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    assert ours.shared.weight is ours.encoder.embed_tokens.weight
    ids, mask = _inputs()
    with torch.no_grad():
        for m in (mask, torch.ones_like(mask)):
            want = ref_cast(ids, m).last_hidden_state
            got = ours(ids, m).last_hidden_state
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the comparison has power: padding changes the states of the padded prompt
    assert not torch.equal(ours(ids, mask).last_hidden_state[1],
                           ours(ids, torch.ones_like(mask)).last_hidden_state[1])  # fmt: skip
    del ref


def test_non_gated_relu_config_is_ours_and_equal(tmp_path):
    ref = _reference(tmp_path, feed_forward_proj="relu")
    ours = load_text_encoder(tmp_path / "te", "UMT5EncoderModel", torch.float32,
                             torch.device("cpu"))  # fmt: skip
    assert isinstance(ours, umt5.UMT5Encoder) and not ours.config.gated
    ids, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask).last_hidden_state,
                                   ref(ids, mask).last_hidden_state, rtol=0, atol=0)  # fmt: skip


def test_a_config_it_does_not_cover_loads_with_transformers(tmp_path):
    _reference(tmp_path, feed_forward_proj="gated-gelu_fast")
    cfg = json.loads((tmp_path / "te" / "config.json").read_text())
    assert "gelu_fast" in umt5.supports(cfg)
    model = load_text_encoder(tmp_path / "te", "UMT5EncoderModel", torch.float32,
                              torch.device("cpu"))  # fmt: skip
    assert isinstance(model, UMT5EncoderModel)


def test_building_our_encoder_imports_no_transformers_modeling(tmp_path):
    import subprocess
    import sys

    _reference(tmp_path)
    code = (
        "import sys, torch\n"
        "from fastvideo.models.text_encoders import load_text_encoder\n"
        f"m = load_text_encoder(__import__('pathlib').Path({str(tmp_path / 'te')!r}), "
        "'UMT5EncoderModel', torch.float32, torch.device('cpu'))\n"
        "m(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))\n"
        "bad = sorted(n for n in sys.modules if n.startswith(('transformers.models', "
        "'torch._dynamo')))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


PROMPTS = [
    "a red fox running through a snowy forest, cinematic",
    "",
    "   spaces   and\ttabs\n",
    "Ünïcödé ﬁ ligature ＦＵＬＬＷＩＤＴＨ café",
    "x" * 300 + " a prompt far longer than the padded length " * 10,
]


def _modules_loading_imports(folder: Path, condition: str) -> str:
    """The modules named ``n`` with ``condition`` that load_tokenizer(folder) imports in a
    fresh interpreter, as printed there."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path\n"
        "from fastvideo.models.text_encoders import load_tokenizer\n"
        f"load_tokenizer(Path({str(folder)!r}))\n"
        f"print(sorted(n for n in sys.modules if {condition}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


TRANSFORMERS_KWARGS = dict(padding="max_length", truncation=True, add_special_tokens=True,
                           return_attention_mask=True, return_tensors="pt")  # fmt: skip


def _spm_tokenizer(folder: Path, sequence_normalizer: bool) -> Path:
    """A UMT5-like tokenizer: a SentencePiece unigram model with nmt_nfkc normalisation
    (whose charsmap lands in tokenizer.json as a ``Precompiled`` normaliser, as in UMT5's),
    converted and saved by transformers; optionally with that normaliser inside a Sequence
    (as transformers 4's converter writes it)."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import T5Tokenizer

    folder.mkdir()
    words = ["fox", "forest", "snowy", "cinematic", "running", "café", "ligature", "red"]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(6)) for i in range(200)]
    lines += ["Ünïcödé ＦＵＬＬＷＩＤＴＨ ﬁ", "abcdefghijklmnopqrstuvwxyz 0123456789 .,!?"]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=60,
        model_type="unigram", normalization_rule_name="nmt_nfkc", pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 3})
    )
    out = folder / "saved"
    T5Tokenizer.from_pretrained(str(folder)).save_pretrained(str(out))
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["normalizer"]["type"] == "Precompiled"
    if sequence_normalizer:
        replace = {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}
        data["normalizer"] = {"type": "Sequence", "normalizers": [data["normalizer"], replace]}
        (out / "tokenizer.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    return out


@pytest.mark.parametrize("kind", ["demo", "spm", "spm-sequence"])
def test_t5_tokenizer_gives_transformers_ids_without_importing_it(tmp_path, kind):
    """load_tokenizer builds T5 tokenizers with the tokenizers library alone, and they give
    the ids and masks of transformers' AutoTokenizer on the same folder: raw and cleaned
    prompts, empty, unicode, truncated, with an extra-id token; for the demo checkpoint's
    tokenizer and for SentencePiece ones with UMT5's Precompiled normaliser."""

    from transformers import AutoTokenizer

    from fastvideo.models import t5_tokenizer
    from fastvideo.models.text_encoders import clean_prompt, load_tokenizer
    from fastvideo.models.wan.demo import _write_tokenizer

    if kind == "demo":
        folder = tmp_path / "tok"
        folder.mkdir()
        _write_tokenizer(folder)
    else:
        folder = _spm_tokenizer(tmp_path / "spm", sequence_normalizer=kind == "spm-sequence")
    ours, ref = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    assert isinstance(ours, t5_tokenizer.T5UnigramTokenizer)
    prompts = PROMPTS + [clean_prompt(p) for p in PROMPTS] + ["a <extra_id_1> b", "café"]
    for length in (24, 7):
        got, want = ours(prompts, length), ref(prompts, max_length=length, **TRANSFORMERS_KWARGS)
        assert torch.equal(got.input_ids, want.input_ids), length
        assert torch.equal(got.attention_mask, want.attention_mask), length
    assert (got.attention_mask == 0).any() and got.attention_mask[len(PROMPTS) - 1].all()
    assert _modules_loading_imports(folder, "n.startswith('transformers')") == "[]"


def test_t5_tokenizer_refuses_what_transformers_would_build_otherwise(tmp_path, monkeypatch):
    """Other classes, byte-fallback or other-unk Unigram files and transformers 4 go to
    transformers' own classes; bad padding sides and pad tokens fail clearly."""
    from fastvideo.models import t5_tokenizer
    from fastvideo.models.wan.demo import _write_tokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    _write_tokenizer(folder)
    assert t5_tokenizer.builds_t5(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    for change in ({"byte_fallback": True}, {"unk_id": 1}):
        other = tmp_path / f"other{len(list(tmp_path.iterdir()))}"
        other.mkdir()
        (other / "tokenizer_config.json").write_bytes(
            (folder / "tokenizer_config.json").read_bytes()
        )
        (other / "tokenizer.json").write_text(
            json.dumps({**data, "model": {**data["model"], **change}})
        )
        assert not t5_tokenizer.builds_t5(other), change
    monkeypatch.setattr(t5_tokenizer, "_transformers_major", lambda: 4)
    assert not t5_tokenizer.builds_t5(folder)
    monkeypatch.undo()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "up"}))
    with pytest.raises(ValueError, match="padding_side"):
        t5_tokenizer.T5UnigramTokenizer.from_folder(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<nope>"}))
    with pytest.raises(ValueError, match="pad token"):
        t5_tokenizer.T5UnigramTokenizer.from_folder(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "X"}))
    assert not t5_tokenizer.builds_t5(folder)


def test_other_tokenizers_are_autotokenizers_without_the_auto_classes(tmp_path):
    """load_tokenizer for a class other than T5's: the class tokenizer_config.json names
    (fast variant first), so the ids are AutoTokenizer's whatever transformers version
    builds them; a folder naming no class still loads through AutoTokenizer."""

    from transformers import AutoTokenizer

    from fastvideo.models.text_encoders import load_tokenizer
    from fastvideo.models.wan.demo import _write_tokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    _write_tokenizer(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    ours, ref = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    assert type(ours) is type(ref)
    kwargs = dict(max_length=24, **TRANSFORMERS_KWARGS)
    got, want = ours(PROMPTS, **kwargs), ref(PROMPTS, **kwargs)
    assert torch.equal(got.input_ids, want.input_ids)
    assert torch.equal(got.attention_mask, want.attention_mask)
    assert _modules_loading_imports(folder, "'tokenization_auto' in n or '.modeling_' in n") == "[]"
    config.pop("tokenizer_class")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    plain = AutoTokenizer.from_pretrained(str(folder))(PROMPTS, **kwargs).input_ids
    assert torch.equal(load_tokenizer(folder)(PROMPTS, **kwargs).input_ids, plain)
