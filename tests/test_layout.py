"""The package's floors: imports run one way, light packages import without torch, and a
model family is one folder (a toy family from a temporary folder generates videos with
nothing else edited)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fastvideo"

# Lowest first. A module may import only from packages on a strictly lower floor (and
# from its own package). Top-level modules count as packages of their own.
FLOORS = [
    {"logger", "envs"},
    {"scheduler", "distributed", "kernels_bridge"},
    {"wire", "cache"},
    {"layers"},
    {"pipelines"},
    {"models"},
    {"config"},
    {"worker"},
    {"executor"},
    {"engine"},
    {"entrypoints"},
    {"__init__"},
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}


def _unit(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, fastvideo module) of every import in the file, lazy ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return [(line, name) for line, name in out if name.startswith("fastvideo.")]


def test_every_package_has_a_floor():
    units = {_unit(p) for p in PACKAGE.rglob("*.py")}
    assert units <= set(FLOOR), f"packages without a floor: {sorted(units - set(FLOOR))}"


def test_imports_only_go_down_a_floor():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        for line, module in _imports(path):
            target = module.split(".")[1]
            if target != unit and FLOOR[target] >= FLOOR[unit]:
                offenders.append(f"{path.relative_to(REPO)}:{line}: {unit} imports {module}")
    assert not offenders, "imports into the same or a higher floor:\n" + "\n".join(offenders)


def test_no_module_outside_a_family_imports_it():
    shared = {"samplers"}  # subpackages of models/ that are not families
    families = [
        p.name
        for p in (PACKAGE / "models").iterdir()
        if (p / "__init__.py").is_file() and p.name not in shared
    ]
    assert {"wan", "hunyuan"} <= set(families)
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).parts
        own = rel[1] if len(rel) > 2 and rel[0] == "models" else None
        for line, module in _imports(path):
            parts = module.split(".")
            if len(parts) > 2 and parts[1] == "models" and parts[2] in families:
                if parts[2] != own:
                    offenders.append(f"{path.relative_to(REPO)}:{line}: imports {module}")
    assert not offenders, "\n".join(offenders)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_scheduler_imports_without_torch():
    proc = _python("import sys; sys.modules['torch'] = None; import fastvideo.scheduler")
    assert proc.returncode == 0, proc.stderr


def test_importing_fastvideo_is_lazy():
    proc = _python("import sys, fastvideo; assert 'torch' not in sys.modules, 'torch imported'")
    assert proc.returncode == 0, proc.stderr


def test_a_worker_loads_wan_without_the_compiler_or_transformers(tmp_path):
    """torch._dynamo (1-3 s) and transformers' auto classes and modeling code (they import
    its modeling and generation stack: 10 s measured on the H200 machine) stay out of a
    worker's start-up until something compiles: the whole Wan load path, demo model (its
    tokenizer class comes from transformers)."""
    code = f"""
import sys, torch
from pathlib import Path
from fastvideo.config import PipelineConfig
from fastvideo.worker.worker import Worker
d = Path({str(tmp_path / "demo")!r})
w = Worker(0, 1, torch.device("cpu"), d, PipelineConfig.from_pretrained(str(d)))
w.start_reading(); w.init_distributed(None); w.load()
bad = sorted(n for n in sys.modules if n.startswith("torch._dynamo")
             or "tokenization_auto" in n or ".modeling_" in n or "transformers.generation" in n)
print("LOADED", bad[:5])
"""
    write = "from pathlib import Path; from fastvideo.models.wan.demo import write_demo_model; "
    made = _python(write + f"write_demo_model(Path({str(tmp_path / 'demo')!r}))")
    assert made.returncode == 0, made.stderr
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout, proc.stdout


def test_marked_functions_run_eagerly_under_compile():
    """eager_under_compile: a graph break under torch.compile once keep_eager_regions ran,
    also for a reference taken before (the trampoline reads the current implementation)."""
    import torch

    from fastvideo.kernels_bridge.eager import eager_under_compile, keep_eager_regions

    seen: list[bool] = []

    @eager_under_compile
    def probe(x):
        seen.append(torch.compiler.is_compiling())
        return x + 1

    early = probe
    keep_eager_regions()
    compiled = torch.compile(lambda x: early(x) * 2, backend="eager", fullgraph=False)
    assert torch.equal(compiled(torch.ones(2)), torch.full((2,), 4.0))
    assert seen == [False], "the marked function was traced instead of run"


# --- a toy family, registered from a temporary folder --------------------------------------
TOY_REGISTRATION = """
from pathlib import Path

from fastvideo.models.registry import ModelFamily, ModelVariant, register_family
from fastvideo.wire.spec import ModelSpec


def read_spec(model_dir: Path) -> ModelSpec:
    return ModelSpec(family="toy", pipeline_class_name="ToyVideoPipeline", num_heads=1,
                     in_channels=4, patch_size=(1, 1, 1), vae_scale_spatial=4,
                     vae_scale_temporal=1, max_positions=64, latent_channels=4)


TOY = ModelVariant(name="toy", hf_ids=(), sampling_defaults={"height": 16, "width": 16,
                   "num_frames": 3, "num_inference_steps": 3, "guidance_scale": 1.0})
register_family(ModelFamily(name="toy", class_names=("ToyVideoPipeline",),
                            pipeline="toyfam.pipeline:ToyPipeline", read_spec=read_spec,
                            variants=(), fallback=TOY, components=("transformer",)))
"""

TOY_PIPELINE = """
import torch
import torch.nn.functional as F

from fastvideo.models.loader import load_checkpoint, meta_module
from fastvideo.pipelines.base import ComposedPipelineBase
from fastvideo.pipelines.stages.decoding import DecodingStage
from fastvideo.pipelines.stages.denoising import DenoisingStage
from fastvideo.pipelines.stages.input_validation import InputValidationStage
from fastvideo.pipelines.stages.latents import LatentPreparationStage
from fastvideo.pipelines.stages.text_encoding import TextEncodingStage
from fastvideo.pipelines.stages.timesteps import TimestepPreparationStage
from fastvideo.models.samplers import build_scheduler


class ToyDiT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    @property
    def dtype(self):
        return self.proj.weight.dtype

    def forward_tokens(self, tokens, timestep, text, grid, shard=None, cache=None):
        scale = 1.0 + text.mean(dim=(1, 2))[:, None, None] + timestep[:, None, None] / 1000
        return self.proj(tokens) * scale


class ToyVAE:
    dtype = torch.float32

    def unnormalize_latents(self, z):
        return z

    def decode(self, z):  # [B, 4, F, h, w] -> [B, 3, F, 4h, 4w]
        b, c, f, h, w = z.shape
        x = z[:, :3].reshape(b, 3 * f, h, w)
        return torch.tanh(F.interpolate(x, scale_factor=4)).reshape(b, 3, f, 4 * h, 4 * w)


def encode(prompts, item):
    codes = torch.tensor([[float(sum(map(ord, p)) % 7) / 7] for p in prompts])
    return {"text": codes[:, None, :].expand(len(prompts), 2, 3).contiguous()}


def spec(n, item):
    return {"text": ((n, 2, 3), torch.float32)}


def load_dit(folder, env):
    return load_checkpoint(meta_module(ToyDiT), folder, env.device, lambda name: torch.float32)


def sampler(folder, env):
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0}
    return lambda: build_scheduler("FlowMatchEulerDiscreteScheduler", config, None)


class ToyPipeline(ComposedPipelineBase):
    component_loaders = {"transformer": load_dit, "scheduler": sampler}

    def create_stages(self):
        env, dit = self.env, self.components["transformer"]
        return [InputValidationStage(env), TextEncodingStage(encode, env, spec),
                TimestepPreparationStage(self.components["scheduler"]),
                LatentPreparationStage(env, 4), DenoisingStage(dit, env),
                DecodingStage(ToyVAE(), env)]
"""


@pytest.fixture(scope="module")
def toy_family(tmp_path_factory):
    """(folder holding the toy family package, a toy checkpoint folder)."""
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("families")
    package = root / "toyfam"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "registration.py").write_text(textwrap.dedent(TOY_REGISTRATION))
    (package / "pipeline.py").write_text(textwrap.dedent(TOY_PIPELINE))
    ckpt = tmp_path_factory.mktemp("toy-ckpt")
    (ckpt / "model_index.json").write_text(json.dumps({"_class_name": "ToyVideoPipeline"}))
    (ckpt / "transformer").mkdir()
    torch.manual_seed(0)
    state = {"proj.weight": torch.randn(4, 4) * 0.3, "proj.bias": torch.zeros(4)}
    save_file(state, str(ckpt / "transformer" / "model.safetensors"))
    return root, ckpt


@pytest.mark.slow
def test_a_toy_family_from_a_folder_generates(toy_family):
    root, ckpt = toy_family
    code = textwrap.dedent(f"""
        import numpy as np
        from fastvideo import VideoGenerator
        outs = {{}}
        for executor in ("inproc", "mp"):
            with VideoGenerator.from_pretrained({str(ckpt)!r}, executor=executor) as gen:
                outs[executor] = [gen.generate_video(p, seed=1) for p in ("a fox", "a cat!")]
        a, b = outs["inproc"]
        assert a.frames.shape == (3, 16, 16, 3), a.frames.shape
        assert not np.array_equal(a.frames, b.frames), "the prompt reached the toy DiT"
        for x, y in zip(outs["inproc"], outs["mp"]):
            assert np.array_equal(x.frames, y.frames)
        print("TOY-OK", a.plan)
    """)
    proc = _python(code, FASTVIDEO_FAMILY_PATH=str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TOY-OK single rank" in proc.stdout
