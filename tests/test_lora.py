"""LoRA merging (fastvideo.models.lora) against diffusers + PEFT, the oracle.

LoRAs are made with PEFT (``add_adapter`` with random, non-zero factors), saved with
diffusers' ``WanPipeline.save_lora_weights`` (rank/alpha in the file's metadata), and
loaded two ways: diffusers' ``load_lora_weights`` (+ ``fuse_lora`` / ``set_adapters``)
into its WanTransformer3DModel, and ours into our WanTransformer3D loaded from the same
checkpoint. DiT outputs must agree within REL_TOL (fp32; measured ~3e-7, see -s).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import peft
import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastvideo.models.lora import LoraError, LoraManager, load_loras, parse_lora_arg
from fastvideo.models.wan.transformer import WanTransformer3D, WanTransformerConfig

REL_TOL = 1e-5
ALL_LINEARS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "proj_out"]

# Our (diffusers) module names -> Wan's original ones, written out independently of the
# implementation's table so the test checks it.
WAN_NAMES = [
    ("attn1.to_q", "self_attn.q"), ("attn1.to_k", "self_attn.k"), ("attn1.to_v", "self_attn.v"),
    ("attn1.to_out.0", "self_attn.o"), ("attn2.to_q", "cross_attn.q"),
    ("attn2.to_k", "cross_attn.k"), ("attn2.to_v", "cross_attn.v"),
    ("attn2.to_out.0", "cross_attn.o"), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"), ("condition_embedder.time_proj", "time_projection.1"),
]  # fmt: skip


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _ours(folder: Path) -> WanTransformer3D:
    """Our DiT from the diffusers checkpoint (fp32, one rank)."""
    config = WanTransformerConfig.from_dict(json.loads((folder / "config.json").read_text()))
    model = WanTransformer3D(config, None)
    (weights,) = folder.glob("*.safetensors")
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    assert not missing and all("norm_added" in k for k in unexpected), (missing, unexpected)
    return model.eval().requires_grad_(False)


def _make_lora(folder: Path, out: Path, seed: int, **config) -> Path:
    """A random PEFT LoRA for the checkpoint's transformer, saved the diffusers way."""
    torch.manual_seed(seed)
    trainee = WanTransformer3DModel.from_pretrained(folder)
    lora_config = peft.LoraConfig(init_lora_weights=False, **config)
    trainee.add_adapter(lora_config)
    state = get_peft_model_state_dict(trainee)
    out.mkdir(parents=True)
    WanPipeline.save_lora_weights(
        out, transformer_lora_layers=state, transformer_lora_adapter_metadata=lora_config.to_dict()
    )
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def ckpt(tiny_a) -> Path:
    return tiny_a[0] / "transformer"


@pytest.fixture(scope="module")
def loras(ckpt, tmp_path_factory) -> dict[str, Path]:
    """'a': rank 4, alpha 8, an alpha pattern, every Linear; 'b': rank 2, alpha 3, some."""
    root = tmp_path_factory.mktemp("loras")
    return {
        "a": _make_lora(ckpt, root / "a", 1, r=4, lora_alpha=8, target_modules=ALL_LINEARS,
                        alpha_pattern={"attn2.to_k": 2}),
        "b": _make_lora(ckpt, root / "b", 2, r=2, lora_alpha=3,
                        target_modules=["to_q", "to_v", "net.2", "time_proj"]),
    }  # fmt: skip


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    return torch.randn(1, 16, 4, 6, 10), torch.tensor([937.0]), torch.randn(1, 11, 32)


def _reference(tiny_a, ckpt: Path) -> WanPipeline:
    """A diffusers pipeline around a fresh transformer (the shared fixture stays clean)."""
    pipe = tiny_a[1]
    transformer = WanTransformer3DModel.from_pretrained(ckpt).eval()
    return WanPipeline(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        scheduler=pipe.scheduler,
        transformer=transformer,
    )


def _forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(*inputs)
    return out[0] if isinstance(out, tuple) else out


def _reference_out(pipe: WanPipeline, inputs) -> torch.Tensor:
    with torch.no_grad():
        return pipe.transformer(*inputs, return_dict=False)[0]


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- parity with diffusers ----------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 0.7, -0.5])
def test_matches_diffusers_fuse_lora(tiny_a, ckpt, loras, inputs, scale):
    ref = _reference(tiny_a, ckpt)
    ref.load_lora_weights(str(loras["a"]))
    ref.fuse_lora(lora_scale=scale)
    ours = _ours(ckpt)
    base = _forward(ours, inputs)
    LoraManager(ours).load(loras["a"], scale=scale)
    out, expected = _forward(ours, inputs), _reference_out(ref, inputs)
    err = _rel(out, expected)
    print(f"\nscale {scale}: relative error vs diffusers fuse_lora {err:.2e}")
    assert err < REL_TOL
    assert _rel(base, expected) > 100 * REL_TOL  # the LoRA does change the output


def test_two_loras_match_diffusers_adapters(tiny_a, ckpt, loras, inputs):
    ref = _reference(tiny_a, ckpt)
    ref.load_lora_weights(str(loras["a"]), adapter_name="a")
    ref.load_lora_weights(str(loras["b"]), adapter_name="b")
    ours = _ours(ckpt)
    manager = LoraManager(ours)
    assert manager.load(loras["a"], scale=0.8, name="a") == "a"
    assert manager.load(loras["b"], scale=0.5, name="b") == "b"
    assert manager.loaded() == {"a": 0.8, "b": 0.5}
    for weights in ([0.8, 0.5], [0.8, -1.5], [0.0, 1.0]):
        ref.set_adapters(["a", "b"], weights)  # diffusers runs them unfused (PEFT layers)
        manager.set_scale("a", weights[0])
        manager.set_scale("b", weights[1])
        err = _rel(_forward(ours, inputs), _reference_out(ref, inputs))
        print(f"\nadapters a, b at {weights}: relative error {err:.2e}")
        assert err < REL_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unload_restores_weights_bitwise(ckpt, loras, dtype):
    ours = _ours(ckpt).to(dtype)
    before = _weights(ours)
    manager = LoraManager(ours)
    manager.load(loras["a"], scale=0.9)
    manager.load(loras["b"], scale=2.0)
    changed = [k for k, v in _weights(ours).items() if not torch.equal(v, before[k])]
    assert {"blocks.0.attn1.to_q.weight", "condition_embedder.time_proj.weight"} <= set(changed)
    manager.set_scale("pytorch_lora_weights", -3.0)  # the first one's default name
    manager.unload("pytorch_lora_weights-2")
    manager.unload("pytorch_lora_weights")
    assert manager.loaded() == {}
    after = _weights(ours)
    assert all(torch.equal(after[k], before[k]) for k in before), "weights not restored bitwise"
    assert all(v.dtype == dtype for k, v in after.items() if k.endswith("to_q.weight"))


def test_merge_arithmetic(ckpt, loras):
    """W = W0 + scale * alpha / rank * B @ A, per module (alpha from the pattern)."""
    ours = _ours(ckpt)
    before = _weights(ours)
    LoraManager(ours).load(loras["a"], scale=0.5)
    tensors = load_file(str(loras["a"]))
    for module, alpha in (("blocks.1.attn1.to_v", 8), ("blocks.1.attn2.to_k", 2)):
        down = tensors[f"transformer.{module}.lora_A.weight"]
        up = tensors[f"transformer.{module}.lora_B.weight"]
        expected = before[f"{module}.weight"] + 0.5 * alpha / 4 * (up @ down)
        torch.testing.assert_close(ours.state_dict()[f"{module}.weight"], expected)


# --- other file formats ----------------------------------------------------------------------
def _to_wan(name: str) -> str:
    for ours, wan in WAN_NAMES:
        if name.endswith(ours):
            return name[: len(name) - len(ours)] + wan
    raise AssertionError(f"no Wan name for {name}")


def _rewrite(src: Path, dst: Path, style: str, skip: tuple[str, ...] = ()) -> Path:
    """The same adapter in another key format, alpha as tensors (no metadata); modules
    named in ``skip`` left out."""
    with safe_open(str(src), "pt") as f:
        packed = json.loads(f.metadata()["lora_adapter_metadata"])
        config = {k.removeprefix("transformer."): v for k, v in packed.items()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        module, kind = key.removeprefix("transformer.").rsplit(".", 2)[0], key.split(".")[-2]
        if module in skip:
            continue
        patterns = config["alpha_pattern"].items()
        alpha = next((a for p, a in patterns if module.endswith(p)), config["lora_alpha"])
        if style == "diffusers-no-prefix":
            out[key.removeprefix("transformer.")] = value
            continue
        wan = _to_wan(module)
        down, up = ("lora_A", "lora_B") if style == "wan-lora-A" else ("lora_down", "lora_up")
        name = {
            "wan": f"diffusion_model.{wan}",
            "wan-lora-A": f"diffusion_model.{wan}",
            "kohya": "lora_unet_" + wan.replace(".", "_"),
        }[style]
        out[f"{name}.{down if kind == 'lora_A' else up}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    if style == "diffusers-no-prefix":
        dst = dst.with_suffix("")
        dst.mkdir()  # PEFT's layout: adapter_model.safetensors + adapter_config.json
        save_file(out, str(dst / "adapter_model.safetensors"))
        (dst / "adapter_config.json").write_text(json.dumps(config))
        return dst
    save_file(out, str(dst))
    return dst


@pytest.mark.parametrize("style", ["wan", "wan-lora-A", "kohya", "diffusers-no-prefix"])
def test_other_formats_merge_the_same(ckpt, loras, tmp_path, style):
    reference = _ours(ckpt)
    LoraManager(reference).load(loras["a"], scale=0.6)
    path = _rewrite(loras["a"], tmp_path / f"{style}.safetensors", style)
    ours = _ours(ckpt)
    LoraManager(ours).load(path, scale=0.6)
    expected, got = reference.state_dict(), ours.state_dict()
    diffs = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not diffs, f"{style}: parameters differ: {diffs[:5]}"


def test_wan_format_matches_diffusers_reading_it(tiny_a, ckpt, loras, inputs, tmp_path):
    """diffusers converts Wan-format files itself: a second, independent oracle. (Its
    converter rejects an alpha on head.head, so proj_out is left out here.)"""
    path = _rewrite(loras["a"], tmp_path / "wan.safetensors", "wan", skip=("proj_out",))
    ref = _reference(tiny_a, ckpt)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=0.6)
    ours = _ours(ckpt)
    LoraManager(ours).load(path, scale=0.6)
    err = _rel(_forward(ours, inputs), _reference_out(ref, inputs))
    print(f"\nWan format vs diffusers' own conversion: relative error {err:.2e}")
    assert err < REL_TOL


def test_full_diffs_for_biases_norms_and_modulation(ckpt, tmp_path):
    ours = _ours(ckpt)
    before = _weights(ours)
    dim = ours.config.inner_dim
    torch.manual_seed(3)
    deltas = {
        "diffusion_model.blocks.0.self_attn.q.diff_b": torch.randn(dim),
        "diffusion_model.blocks.0.norm3.diff": torch.randn(dim),  # Wan's norm3 = our norm2
        "diffusion_model.blocks.1.modulation.diff": torch.randn(1, 6, dim),
        "diffusion_model.blocks.1.norm1.diff": torch.zeros(dim),  # no parameter: zero, skipped
    }
    save_file(deltas, str(tmp_path / "diffs.safetensors"))
    manager = LoraManager(ours)
    manager.load(tmp_path / "diffs.safetensors", scale=2.0)
    now = ours.state_dict()
    for ours_name, key in (
        ("blocks.0.attn1.to_q.bias", "diffusion_model.blocks.0.self_attn.q.diff_b"),
        ("blocks.0.norm2.weight", "diffusion_model.blocks.0.norm3.diff"),
        ("blocks.1.scale_shift_table", "diffusion_model.blocks.1.modulation.diff"),
    ):
        torch.testing.assert_close(now[ours_name], before[ours_name] + 2.0 * deltas[key])
    manager.unload_all()
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


# --- errors ---------------------------------------------------------------------------------
def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


A, B = torch.randn(4, 48), torch.randn(48, 4)  # rank 4 for the 48-wide tiny model


@pytest.mark.parametrize(
    "tensors, words",
    [
        ({"transformer.blocks.0.attn1.to_zz.lora_A.weight": A,
          "transformer.blocks.0.attn1.to_zz.lora_B.weight": B},
         ["match no parameter", "transformer.blocks.0.attn1.to_zz.lora_A.weight"]),
        ({"diffusion_model.blocks.9.self_attn.q.lora_down.weight": A,
          "diffusion_model.blocks.9.self_attn.q.lora_up.weight": B},
         ["match no parameter", "blocks.9.self_attn.q.lora_down.weight"]),
        ({"diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": A,
          "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": B},
         ["match no parameter", "k_img"]),
        ({"transformer.blocks.0.attn1.to_q.lora_A.weight": A},
         ["blocks.0.attn1.to_q", "no lora_up/B"]),
        ({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 40),
          "transformer.blocks.0.attn1.to_q.lora_B.weight": B},
         ["do not fit", "(4, 40)"]),
        ({"transformer.blocks.0.attn1.to_q.lora_A.weight": A,
          "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.randn(48, 3)},
         ["rank-r pair"]),
        ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": A,
          "diffusion_model.blocks.0.self_attn.q.lora_up.weight": B,
          "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.ones(48, 1)},
         ["unsupported", "dora_scale"]),
        ({"diffusion_model.blocks.0.norm1.diff": torch.ones(48)},
         ["match no parameter", "norm1.diff"]),
    ],
    ids=["unknown-module", "block-out-of-range", "i2v-key", "half-pair", "shape",
         "rank-mismatch", "dora", "nonzero-diff-without-parameter"],
)  # fmt: skip
def test_bad_files_fail_clearly(ckpt, tmp_path, tensors, words):
    ours = _ours(ckpt)
    before = _weights(ours)
    path = _write(tmp_path / "bad.safetensors", tensors)
    manager = LoraManager(ours)
    with pytest.raises(LoraError) as info:
        manager.load(path)
    message = str(info.value)
    print(f"\n{message}")
    assert str(path) in message and all(w in message for w in words), message
    assert manager.loaded() == {}
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


def test_unreadable_files_and_names(ckpt, loras, tmp_path):
    manager = LoraManager(_ours(ckpt))
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(LoraError, match="does not exist"):
        manager.load(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(LoraError, match="cannot read LoRA file .*garbage.safetensors"):
        manager.load(garbage)
    manager.load(loras["a"], name="style")
    with pytest.raises(ValueError, match="already loaded"):
        manager.load(loras["b"], name="style")
    with pytest.raises(KeyError, match="no LoRA named 'other'"):
        manager.set_scale("other", 1.0)
    with pytest.raises(ValueError, match="finite number"):
        manager.set_scale("style", math.nan)
    with pytest.raises(KeyError):
        manager.unload("other")


def test_load_loras_from_cli_specs(ckpt, loras):
    expected = _ours(ckpt)
    manager = LoraManager(expected)
    manager.load(loras["a"], 0.7)
    manager.load(loras["b"], 1.0)
    ours = _ours(ckpt)
    specs = [f"{loras['a']}:0.7", str(loras["b"])]
    assert list(load_loras(ours, specs).loaded().values()) == [0.7, 1.0]
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in ours.state_dict().items())


def test_parse_lora_arg():
    assert parse_lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_arg("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert parse_lora_arg("C:/x/style.safetensors:-1") == ("C:/x/style.safetensors", -1.0)
    assert parse_lora_arg("dir:with:colons/a.safetensors") == ("dir:with:colons/a.safetensors", 1.0)


# --- through the engine --------------------------------------------------------------------
ENGINE_RUN = dict(negative_prompt="blurry", seed=5, height=32, width=32, num_frames=5,
                  num_inference_steps=3, output_type="latent")  # fmt: skip


def _diffusers_latents(tiny_a, ckpt, lora: Path, scale: float) -> torch.Tensor:
    pipe = _reference(tiny_a, ckpt)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.fuse_lora(lora_scale=scale)
    out = pipe(
        prompt="a fox",
        output_type="latent",
        generator=torch.Generator().manual_seed(5),
        **{k: v for k, v in ENGINE_RUN.items() if k not in ("seed", "output_type")},
    )
    return out.frames[0]  # fmt: skip


@pytest.mark.slow
def test_lora_through_the_engine_matches_diffusers(tiny_a, ckpt, loras):
    """--lora at load (in a worker process) and load_lora/unload_lora at run time give
    diffusers' fused-LoRA latents; unloading gives the plain model back exactly."""
    from fastvideo import VideoGenerator

    folder = str(tiny_a[0])
    ref = _diffusers_latents(tiny_a, ckpt, loras["a"], 0.7)
    with VideoGenerator.from_pretrained(folder, lora=[f"{loras['a']}:0.7"]) as gen:
        at_load = gen.generate_video("a fox", **ENGINE_RUN).latents
        assert gen.loras() == {loras["a"].stem: 0.7}
    with VideoGenerator.from_pretrained(folder, executor="inproc") as gen:
        plain = gen.generate_video("a fox", **ENGINE_RUN).latents
        name = gen.load_lora(loras["a"], scale=0.7)
        live = gen.generate_video("a fox", **ENGINE_RUN).latents
        gen.set_lora_scale(name, 0.0)
        zero = gen.generate_video("a fox", **ENGINE_RUN).latents
        gen.unload_lora(name)
        after = gen.generate_video("a fox", **ENGINE_RUN).latents
        with pytest.raises(ValueError, match="no such file"):
            gen.load_lora("/no/such.safetensors")
        with pytest.raises(RuntimeError, match="no LoRA named"):
            gen.unload_lora("never-loaded")
        for bad in (math.inf, -math.inf, math.nan, True, "1"):  # refused on the driver
            with pytest.raises(ValueError, match="finite number"):
                gen.set_lora_scale("any", bad)
            with pytest.raises(ValueError, match="finite number"):
                gen.load_lora(loras["a"], scale=bad)
        assert gen.loras() == {}
    assert _rel(at_load, ref) < 1e-5 and _rel(live, ref) < 1e-5
    assert _rel(plain, ref) > 1e-3, "the LoRA must change the output"
    assert torch.equal(after, plain) and _rel(zero, plain) < 1e-6


def test_loras_over_http_match_diffusers(tiny_a, ckpt, loras):
    """/v1/loras on a real server: loaded from the server's LoRA folder only (403 without
    one, 400 outside it), listed, rescaled, unloaded; what the engine then generates is
    diffusers' fused-LoRA output, and the plain model exactly after unloading."""
    import httpx

    from fastvideo import AsyncVideoEngine, VideoGenerator
    from fastvideo.entrypoints.http import build_app
    from tests.test_http import ServerThread

    ref = _diffusers_latents(tiny_a, ckpt, loras["a"], 0.7)
    root = loras["a"].parent.parent
    engine = AsyncVideoEngine.from_pretrained(str(tiny_a[0]), executor="inproc")
    gen = VideoGenerator(engine.core)  # the same engine, blocking, for the latents
    try:
        plain = gen.generate_video("a fox", **ENGINE_RUN).latents
        locked = build_app(engine, output_dir=root / "out-locked")
        with ServerThread(locked) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.get("/v1/loras").json() == {"object": "list", "data": []}
            for call in (lambda: c.post("/v1/loras", json={"path": "a/x.safetensors"}),
                         lambda: c.patch("/v1/loras/x", json={"scale": 1.0}),
                         lambda: c.delete("/v1/loras/x")):  # fmt: skip
                r = call()
                assert r.status_code == 403 and "--lora-dir" in r.json()["error"]["message"]
        app = build_app(engine, output_dir=root / "out", lora_dir=root)
        with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            a_file = loras["a"].relative_to(root).as_posix()
            for body, status, param in (
                ({"path": "../" + root.name + "/" + a_file}, 200, None),  # inside, via ..
                ({"path": "/etc/hostname"}, 400, "path"),
                ({"path": "../../outside.safetensors"}, 400, "path"),
                ({"path": "a/missing.safetensors"}, 404, "path"),
                ({"path": a_file, "scale": "big"}, 422, "scale"),
                ({"path": a_file, "rank": 4}, 422, "rank"),
            ):
                r = c.post("/v1/loras", json={**body, "name": "probe"})
                assert r.status_code == status, (body, r.text)
                if param is not None:
                    assert r.json()["error"]["param"] == param, r.text
            assert c.delete("/v1/loras/probe").json()["deleted"] is True
            r = c.post("/v1/loras", json={"path": a_file, "scale": 0.7, "name": "style"})
            assert r.status_code == 200 and r.json()["name"] == "style", r.text
            assert c.post("/v1/loras", json={"path": a_file, "name": "style"}).status_code == 409
            listed = c.get("/v1/loras").json()["data"]
            assert listed == [{"object": "lora", "name": "style", "scale": 0.7}]
            live = gen.generate_video("a fox", **ENGINE_RUN).latents
            assert c.patch("/v1/loras/style", json={"scale": 0.0}).status_code == 200
            zero = gen.generate_video("a fox", **ENGINE_RUN).latents
            assert c.patch("/v1/loras/nope", json={"scale": 1.0}).status_code == 404
            assert c.delete("/v1/loras/style").status_code == 200
            assert c.delete("/v1/loras/style").status_code == 404
            assert c.get("/v1/loras").json()["data"] == []
        after = gen.generate_video("a fox", **ENGINE_RUN).latents
    finally:
        engine.shutdown()
    assert _rel(live, ref) < 1e-5 and _rel(plain, ref) > 1e-3
    assert _rel(zero, plain) < 1e-6 and torch.equal(after, plain)
