"""Wan's text pieces without transformers: our UMT5 encoder against transformers'
UMT5EncoderModel (same checkpoint, saved by transformers and read by our loader; same
states in fp32, bf16 and fp16, with and without padding; configs it does not cover go to
transformers), and the tokenizer.json tokenizer against AutoTokenizer."""

from __future__ import annotations

import json

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


def test_tokenizer_is_autotokenizers_without_the_auto_classes(tmp_path):
    """load_tokenizer: the class tokenizer_config.json names (fast variant first), so the
    ids are AutoTokenizer's whatever transformers version builds them; a folder naming no
    class still loads through AutoTokenizer."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from fastvideo.models.text_encoders import load_tokenizer
    from fastvideo.models.wan.demo import _write_tokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    _write_tokenizer(folder)
    ours, ref = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    assert type(ours) is type(ref)
    kwargs = dict(padding="max_length", max_length=24, truncation=True, add_special_tokens=True,
                  return_attention_mask=True, return_tensors="pt")  # fmt: skip
    got, want = ours(PROMPTS, **kwargs), ref(PROMPTS, **kwargs)
    assert torch.equal(got.input_ids, want.input_ids)
    assert torch.equal(got.attention_mask, want.attention_mask)
    assert (got.attention_mask == 0).any() and got.attention_mask[-1].all()
    code = (
        "import sys; from pathlib import Path\n"
        "from fastvideo.models.text_encoders import load_tokenizer\n"
        f"load_tokenizer(Path({str(folder)!r}))\n"
        "print(sorted(n for n in sys.modules if 'tokenization_auto' in n or '.modeling_' in n))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    plain = AutoTokenizer.from_pretrained(str(folder))(PROMPTS, **kwargs).input_ids
    assert torch.equal(load_tokenizer(folder)(PROMPTS, **kwargs).input_ids, plain)
