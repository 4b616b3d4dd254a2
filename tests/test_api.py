"""The user-facing Python API: the design's seed example, per-model defaults, overrides,
request validation, model resolution errors, GPU-count checks, saving, and seeding.

Everything runs on CPU. Only the seed example (2 worker processes, CFG-parallel, a
512x288 video of the demo model) uses the multi-process executor; the rest runs
in-process.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import socket
import time

import av
import msgspec
import numpy as np
import pytest
import torch

import fastvideo.engine.startup as startup_module
from fastvideo import DEMO_MODEL_ID, PipelineConfig, SamplingParam, VideoGenerator, VideoOutput
from fastvideo.cache.calibration import MagCacheCalibration, TeaCacheCalibration
from fastvideo.config import _ROUTES, _SUBCONFIGS, VAEConfig

STAGES = (
    "input_validation",
    "text_encoding",
    "timestep_preparation",
    "latent_preparation",
    "denoising",
    "decoding",
)
WAN_13B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
WAN_14B = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
# The negative prompt Wan2.1 was published with (Wan2.1's shared_config.sample_neg_prompt).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=2)


class SubmitSpy:
    """Wraps ``executor.submit``: records every request that reaches the executor."""

    def __init__(self, executor):
        self.requests = []
        self._submit = executor.submit

    def __call__(self, request, on_progress=None):
        self.requests.append(request)
        return self._submit(request, on_progress)


@pytest.fixture
def no_workers(monkeypatch):
    """Fail the test if anything tries to start workers (i.e. load a model)."""

    def refuse(*args, **kwargs):
        raise AssertionError("workers were started (model work began)")

    monkeypatch.setattr(startup_module, "create_executor", refuse)


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test on any DNS look-up, TCP connection or Hugging Face download."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse()
        return real_connect(self, address)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


@pytest.fixture(scope="module")
def demo_gen():
    """One in-process generator on the built-in demo model, shared by the module."""
    with VideoGenerator.from_pretrained(DEMO_MODEL_ID, executor="inproc") as gen:
        yield gen


@pytest.fixture
def spy(tiny_gen, monkeypatch):
    s = SubmitSpy(tiny_gen.executor)
    monkeypatch.setattr(tiny_gen.executor, "submit", s)
    return s


# --- the seed example ----------------------------------------------------------------------
@pytest.mark.slow
def test_seed_example_two_cpu_workers_cfg_parallel():
    model_name = DEMO_MODEL_ID
    config = PipelineConfig.from_pretrained(model_name)
    config.num_gpus = 2
    config.vae_config.vae_precision = "fp32"
    generator = VideoGenerator.from_pretrained(model_name, pipeline_config=config)
    try:
        spy = SubmitSpy(generator.executor)
        generator.executor.submit = spy
        param = SamplingParam.from_pretrained(model_name)
        param.num_inference_steps = 30
        param.guidance_scale = 7.5
        param.width = 512  # the seed's example used 1024x576: a quarter of it, for CPU time
        param.height = 288
        events = []
        video = generator.generate_video(
            "fox in the forest ...",
            sampling_param=param,
            num_inference_steps=35,  # kwargs override the param
            callback_on_step_end=events.append,
        )
    finally:
        generator.shutdown()
    assert not generator.executor.is_alive

    assert isinstance(video, VideoOutput)
    assert video.frames.dtype == np.uint8
    assert video.frames.shape == (5, 288, 512, 3)  # the demo model's default num_frames
    assert video.frames.std() > 0, "frames are flat"
    assert video.fps == param.fps == 16
    assert video.seed == param.seed
    assert video.prompt == "fox in the forest ..."
    for stage in STAGES:
        assert video.timings[stage] > 0, stage
    assert video.plan == "CFG 2"
    # The keyword override reached the workers, and did not touch the caller's param.
    (batch,) = spy.requests
    (item,) = batch.items
    assert item.num_inference_steps == 35
    assert (item.height, item.width, item.guidance_scale) == (288, 512, 7.5)
    assert param.num_inference_steps == 30
    # The workers ran 35 steps: one progress event each, out of 35.
    steps = [e for e in events if e.stage == "denoising"]
    assert len({e.step for e in steps}) == 35 and {e.total_steps for e in steps} == {35}


# --- defaults ------------------------------------------------------------------------------
def test_registered_hub_ids_give_their_defaults_without_network(no_network):
    p = SamplingParam.from_pretrained(WAN_13B)
    assert (p.height, p.width, p.num_frames) == (480, 832, 81)
    assert (p.num_inference_steps, p.guidance_scale, p.fps) == (50, 5.0, 16)
    assert p.negative_prompt == WAN_NEGATIVE_PROMPT
    assert PipelineConfig.from_pretrained(WAN_13B).flow_shift == 3.0

    p14 = SamplingParam.from_pretrained(WAN_14B)
    assert (p14.height, p14.width, p14.num_frames) == (720, 1280, 81)
    assert p14.negative_prompt == WAN_NEGATIVE_PROMPT
    assert PipelineConfig.from_pretrained(WAN_14B).flow_shift == 5.0
    # Step caches: the published calibrations per model, off by default.
    assert p.cache is None and p.cache_thresh is None
    c13, c14 = PipelineConfig.from_pretrained(WAN_13B), PipelineConfig.from_pretrained(WAN_14B)
    assert (c13.teacache.default_thresh, c14.teacache.default_thresh) == (0.08, 0.2)
    assert c13.teacache.coefficients[0] == -5.21862437e04
    assert c14.teacache.coefficients[0] == -3.03318725e05
    assert (c13.magcache.ratios[2], c14.magcache.ratios[2]) == (1.0124, 1.02504)
    assert len(c13.magcache.ratios) == len(c14.magcache.ratios) == 100
    assert c13.sta_window_size["480x832x81"] == (5, 2, 5)


def test_local_checkpoint_gets_fallback_defaults(tiny_a, no_network):
    folder, _ = tiny_a
    p = SamplingParam.from_pretrained(str(folder))
    assert (p.height, p.width, p.num_frames) == (480, 832, 81)
    assert (p.num_inference_steps, p.guidance_scale, p.fps) == (50, 5.0, 16)
    assert p.negative_prompt == WAN_NEGATIVE_PROMPT
    assert PipelineConfig.from_pretrained(str(folder)).flow_shift is None


def test_flow_shift_none_uses_the_checkpoint_scheduler_config(tiny_a):
    """tiny_a's scheduler config says flow_shift=3.0: None must equal 3.0, not 5.0."""
    folder, _ = tiny_a
    frames = {}
    for shift in (None, 3.0, 5.0):
        with VideoGenerator.from_pretrained(
            str(folder), executor="inproc", flow_shift=shift
        ) as gen:
            frames[shift] = gen.generate_video("a fox", seed=3, **SMALL).frames
    np.testing.assert_array_equal(frames[None], frames[3.0])
    assert not np.array_equal(frames[None], frames[5.0])


# --- overrides -----------------------------------------------------------------------------
SAMPLING_VALUES = dict(
    negative_prompt="blurry",
    height=32,
    width=48,
    num_frames=9,
    fps=8,
    num_inference_steps=3,
    guidance_scale=2.5,
    seed=7,
    output_path="/somewhere/v.mp4",
    output_type="latent",
    cache="teacache",
    cache_thresh=0.3,
    max_sequence_length=77,
)
# Fields a text-to-video Wan2.1 model refuses (tested with the models that take them).
OTHER_MODELS_ONLY = {"image", "guidance_scale_2", "true_cfg_scale"}
# Fields the driver applies itself (tested in test_api_polish.py).
DRIVER_ONLY = {"num_videos_per_prompt"}
PIPELINE_VALUES = dict(
    model_path="elsewhere",
    num_gpus=2,
    dit_precision="bf16",
    text_encoder_precision="fp16",
    vae_config=VAEConfig(
        vae_precision="bf16",
        vae_tiling=True,
        tile_sample_min_height=128,
        tile_sample_min_width=160,
        tile_sample_stride_height=96,
        tile_sample_stride_width=128,
        vae_parallel_decode=False,
    ),
    vae_tiling=True,
    tile_sample_min_height=128,
    tile_sample_min_width=160,
    tile_sample_stride_height=96,
    tile_sample_stride_width=128,
    vae_parallel_decode=False,
    dit_cpu_offload=True,
    text_encoder_cpu_offload=False,
    image_encoder_cpu_offload=True,
    vae_cpu_offload=False,
    dit_sharded_weights=True,
    offload_headroom_gb=4.0,
    device_memory_gb=24.0,
    attention_backend="sdpa_math",
    flow_shift=4.0,
    scheduler="euler",
    device="cpu",
    executor="inproc",
    ray_address="10.0.0.1:6379",
    ray_allow_cross_node=True,
    cfg_parallel=False,
    sp_degree=2,
    ulysses_degree=2,
    ring_degree=1,
    ready_timeout_s=30.0,
    worker_timeout_s=7.0,
    stall_timeout_s=70.0,
    request_timeout_s=9.0,
    max_batch_size=4,
    max_waiting_requests=8,
    max_inference_steps=99,
    max_tokens=1234,
    max_token_steps=5678,
    parallel_mode="latency",
    throughput_replicas=2,
    sta_tile_size=(1, 8, 16),
    sta_window_size=(3, 3, 3),
    enable_torch_compile=True,
    torch_compile_mode="max-autotune-no-cudagraphs",
    torch_compile_backend="aot_eager",
    compile_cache_dir="/tmp/fastvideo-test-compile",
    compile_warmup=False,
    teacache=TeaCacheCalibration((1.0, 0.0), warmup_steps=2, default_thresh=0.5),
    magcache=MagCacheCalibration((1.0, 1.0, 0.9, 0.8), default_thresh=0.3, max_skip_steps=1),
    lora=["/some/style.safetensors:0.5"],
)
# Every name a PipelineConfig keyword may use: top-level fields and each sub-config's own.
PIPELINE_NAMES = (
    {f.name for f in dataclasses.fields(PipelineConfig) if f.name not in _SUBCONFIGS}
    | {n for n in _ROUTES if n != "vae_precision"}
    | {"vae_config"}
)


def test_override_tables_cover_every_field():
    fields = {f.name for f in dataclasses.fields(SamplingParam)}
    assert set(SAMPLING_VALUES) | OTHER_MODELS_ONLY | DRIVER_ONLY == fields
    assert set(PIPELINE_VALUES) == PIPELINE_NAMES


def test_every_sampling_field_reaches_the_request(tiny_gen, spy, tmp_path):
    """Each SamplingParam field set by keyword arrives in the RequestItem the workers get
    (or, for the driver-only fps and output_path, in the output)."""
    values = {**SAMPLING_VALUES, "output_type": "np", "output_path": str(tmp_path / "v.mp4")}
    out = tiny_gen.generate_video("a fox", **values)
    (batch,) = spy.requests
    (item,) = batch.items
    for name, value in values.items():
        if name in ("fps", "output_path"):
            continue
        assert getattr(item, name) == value, name
    assert out.fps == 8 and out.output_path == tmp_path / "v.mp4"
    assert _read_mp4(out.output_path)[1].shape == (9, 32, 48, 3)


def test_every_pipeline_field_reaches_the_workers():
    """A config with every field changed survives the trip to a worker (the worker decodes
    the driver's config exactly this way) unchanged, and each keyword lands in its field."""
    config = PipelineConfig.from_pretrained(WAN_13B, **PIPELINE_VALUES)
    default = PipelineConfig()
    for name, value in PIPELINE_VALUES.items():
        assert getattr(config, name) == value, name
        assert getattr(default, name) != value, f"{name}: pick a non-default test value"
    on_worker = msgspec.convert(msgspec.to_builtins(config), PipelineConfig)
    assert on_worker == config


def test_sub_config_fields_are_reachable_by_their_own_name():
    config = PipelineConfig()
    config.attention_backend = "sta"
    config.max_batch_size = 3
    assert config.attention_config.attention_backend == "sta"
    assert config.engine_config.max_batch_size == 3
    with pytest.raises(TypeError, match="did you mean 'max_batch_size'"):
        config.update(max_batch_sise=2)


def test_vae_precision_keyword_sets_the_nested_field():
    assert PipelineConfig.from_pretrained(WAN_13B, vae_precision="bf16").vae_config == VAEConfig(
        "bf16"
    )


def test_generate_video_keywords_reach_the_workers_and_leave_the_param_alone(tiny_gen, spy):
    param = tiny_gen.default_sampling_param
    before = param.copy()
    out = tiny_gen.generate_video(
        "a fox",
        sampling_param=param,
        negative_prompt="blurry",
        height=32,
        width=48,
        num_frames=9,
        num_inference_steps=2,
        guidance_scale=2.5,
        seed=7,
        fps=8,
    )
    ((req,),) = [b.items for b in spy.requests]
    assert (req.height, req.width, req.num_frames, req.num_inference_steps) == (32, 48, 9, 2)
    assert (req.negative_prompt, req.guidance_scale, req.seed) == ("blurry", 2.5, 7)
    assert out.frames.shape == (9, 32, 48, 3)
    assert (out.fps, out.seed, out.negative_prompt) == (8, 7, "blurry")
    assert param == before


def test_generator_keywords_override_the_pipeline_config(tiny_a):
    folder, _ = tiny_a
    config = PipelineConfig.from_pretrained(str(folder))
    before = config.copy()
    with VideoGenerator.from_pretrained(
        str(folder), pipeline_config=config, executor="inproc", dit_precision="bf16", flow_shift=4.0
    ) as gen:
        assert (gen.config.dit_precision, gen.config.flow_shift) == ("bf16", 4.0)
        dit = gen.executor._worker.pipeline.components["transformer"]
        assert dit.proj_out.weight.dtype == torch.bfloat16
    assert config == before


def test_unknown_keyword_is_a_type_error_naming_it(tiny_gen, spy, no_workers):
    with pytest.raises(TypeError, match="not_a_field"):
        tiny_gen.generate_video("a fox", not_a_field=1)
    assert spy.requests == []
    with pytest.raises(TypeError, match="not_a_field"):
        VideoGenerator.from_pretrained(DEMO_MODEL_ID, not_a_field=1)
    with pytest.raises(TypeError, match="bogus"):
        SamplingParam.from_pretrained(DEMO_MODEL_ID, bogus=1)
    with pytest.raises(TypeError, match="bogus"):
        PipelineConfig.from_pretrained(DEMO_MODEL_ID, bogus=1)


# --- request validation --------------------------------------------------------------------
BAD_REQUESTS = [
    (dict(height=500), ValueError, ["height", "496 or 512"]),
    (dict(width=100), ValueError, ["width", "multiple of 16", "96 or 112"]),
    (dict(num_frames=80), ValueError, ["num_frames", "77 or 81"]),
    (dict(num_frames=0), ValueError, ["num_frames"]),
    (dict(num_inference_steps=0), ValueError, ["num_inference_steps"]),
    (dict(guidance_scale=-1), ValueError, ["guidance_scale"]),
    (dict(guidance_scale=float("nan")), ValueError, ["guidance_scale"]),
    (dict(prompt=""), ValueError, ["prompt"]),
    (dict(prompt="   "), ValueError, ["prompt"]),
    (dict(prompt=None), TypeError, ["prompt"]),
    (dict(prompt=123), TypeError, ["prompt"]),
    (dict(negative_prompt=5), TypeError, ["negative_prompt"]),
    (dict(seed=-1), ValueError, ["seed"]),
    (dict(seed=2**64), ValueError, ["seed"]),
    (dict(output_type="gif"), ValueError, ["output_type", "gif"]),
    (dict(height=True), TypeError, ["height"]),
    (dict(fps=0), ValueError, ["fps"]),
    (dict(image=np.zeros((32, 32, 3), np.uint8)), ValueError, ["image", "text-to-video"]),
    (dict(guidance_scale_2=3.0), ValueError, ["guidance_scale_2", "two-expert"]),
    (dict(true_cfg_scale=3.0), ValueError, ["true_cfg_scale", "embedded"]),
    (dict(max_sequence_length=513), ValueError, ["max_sequence_length", "512"]),
]


@pytest.mark.parametrize(
    "kwargs, error, words", BAD_REQUESTS, ids=[repr(k) for k, _, _ in BAD_REQUESTS]
)
def test_bad_request_fails_before_any_model_work(tiny_gen, spy, kwargs, error, words):
    kwargs = {**SMALL, **kwargs}
    prompt = kwargs.pop("prompt", "a fox")
    with pytest.raises(error) as info:
        tiny_gen.generate_video(prompt, **kwargs)
    for word in words:
        assert word in str(info.value)
    assert spy.requests == [], "an invalid request reached the executor"


def test_generator_still_serves_after_a_bad_request(tiny_gen, spy):
    with pytest.raises(ValueError):
        tiny_gen.generate_video("a fox", **{**SMALL, "height": 500})
    out = tiny_gen.generate_video("a fox", **SMALL)
    assert len(spy.requests) == 1
    assert out.frames.shape == (5, 32, 48, 3)


# --- model resolution ----------------------------------------------------------------------
def test_nonexistent_local_path(no_workers):
    with pytest.raises(ValueError, match=re.escape("./no/such/dir")):
        VideoGenerator.from_pretrained("./no/such/dir")


def test_unregistered_hub_id_offline_fails_fast(no_workers, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        VideoGenerator.from_pretrained("someone/not-a-model")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "someone/not-a-model" in message
    assert "HF_HUB_OFFLINE" in message and "not downloaded" in message


def test_folder_without_model_index(tmp_path, no_workers):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(ValueError) as info:
        VideoGenerator.from_pretrained(str(tmp_path))
    assert str(tmp_path) in str(info.value)
    assert "model_index.json" in str(info.value).replace(str(tmp_path), "<folder>")


def test_unsupported_pipeline_class_lists_the_supported_ones(tiny_a, tmp_path, no_workers):
    folder = shutil.copytree(tiny_a[0], tmp_path / "sd")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as info:
        VideoGenerator.from_pretrained(str(folder))
    assert "StableDiffusionPipeline" in str(info.value)
    assert "WanPipeline" in str(info.value)


# --- GPU count -----------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_more_gpus_than_visible(no_workers):
    with pytest.raises(ValueError, match=r"num_gpus=2 but 0 CUDA device\(s\) are visible"):
        VideoGenerator.from_pretrained(DEMO_MODEL_ID, device="cuda", num_gpus=2)


def test_zero_gpus(no_workers):
    with pytest.raises(ValueError, match="num_gpus"):
        VideoGenerator.from_pretrained(DEMO_MODEL_ID, num_gpus=0)


def test_inproc_runs_one_rank_only(no_workers):
    with pytest.raises(ValueError, match="inproc"):
        VideoGenerator.from_pretrained(DEMO_MODEL_ID, executor="inproc", num_gpus=2)


# --- output --------------------------------------------------------------------------------
def _read_mp4(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    return codec, frames


def test_save_writes_h264_mp4(demo_gen, tmp_path):
    out = demo_gen.generate_video("a fox", num_inference_steps=2)
    t, h, w, _ = out.frames.shape
    path = out.save(tmp_path / "x.mp4")
    assert path == tmp_path / "x.mp4" == out.output_path
    codec, frames = _read_mp4(path)
    assert codec == "h264"
    assert frames.shape == (t, h, w, 3)
    # Lossy, but the same picture (a channel swap or wrong frame order would be far off).
    assert np.abs(frames.astype(int) - out.frames.astype(int)).mean() < 12


@pytest.mark.parametrize("fps", [8, 24])
def test_saved_mp4_has_the_requested_frame_rate(demo_gen, tmp_path, fps):
    out = demo_gen.generate_video("a fox", num_inference_steps=1, fps=fps,
                                  output_path=str(tmp_path / "v.mp4"))  # fmt: skip
    with av.open(str(out.output_path)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == fps
        assert stream.frames == out.frames.shape[0]


def test_output_path_folder_saves_a_file_named_after_the_prompt(demo_gen, tmp_path):
    folder = tmp_path / "dir"
    out = demo_gen.generate_video(
        "a cat in the snow", num_inference_steps=2, output_path=str(folder)
    )
    assert out.output_path == folder / "a cat in the snow-1024.mp4"
    assert [p.name for p in folder.iterdir()] == ["a cat in the snow-1024.mp4"]
    assert _read_mp4(out.output_path)[1].shape == out.frames.shape


def test_output_path_file_saves_exactly_there(demo_gen, tmp_path):
    target = tmp_path / "sub" / "clip.mp4"
    out = demo_gen.generate_video("a fox", num_inference_steps=2, output_path=str(target))
    assert out.output_path == target
    assert [p.name for p in target.parent.iterdir()] == ["clip.mp4"]
    assert _read_mp4(target)[1].shape == out.frames.shape


def test_latent_output(demo_gen, tmp_path):
    out = demo_gen.generate_video(
        "a fox", height=48, width=64, num_frames=5, num_inference_steps=2, output_type="latent"
    )
    assert out.frames is None
    assert tuple(out.latents.shape) == (16, 2, 48 // 8, 64 // 8)
    assert out.latents.dtype == torch.float32
    with pytest.raises(ValueError):
        out.save(tmp_path / "latent.mp4")
    assert not (tmp_path / "latent.mp4").exists()


# --- seeds ---------------------------------------------------------------------------------
def test_same_seed_same_frames_different_seed_different_frames(demo_gen):
    a = demo_gen.generate_video("a fox", seed=11, num_inference_steps=2).frames
    b = demo_gen.generate_video("a fox", seed=11, num_inference_steps=2).frames
    c = demo_gen.generate_video("a fox", seed=12, num_inference_steps=2).frames
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("seed", [0, 2**63 - 1])
def test_seed_range_ends_are_accepted(demo_gen, seed):
    out = demo_gen.generate_video("a fox", seed=seed, num_inference_steps=2)
    assert out.seed == seed
    assert out.frames.shape[0] == 5
