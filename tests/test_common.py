"""common.py: device resolution (with a stand-in torch_npu), loading, preprocessing, synthetic weights, reports."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PHOTOS, ROOT, tiny_config
from PIL import Image

import common
from mobilevit_npu import devices, errors, models, preprocessing, reports, synthetic

# ------------------------------------------------------------------------------------------------ stand-in torch_npu

FAKE_TORCH_NPU = {
    "torch_npu/__init__.py": """
        import types
        __version__ = "2.5.1.fake"
        CALLS = [("import torch_npu",)]

        def _record(name, result=None):
            def fn(*args, **kwargs):
                CALLS.append((name,) + args + tuple(sorted(kwargs.items())))
                return result
            return fn

        npu = types.SimpleNamespace(
            is_available=_record("is_available", True),
            device_count=_record("device_count", 2),
            set_compile_mode=_record("set_compile_mode"),
            set_device=_record("set_device"),
            synchronize=_record("synchronize"),
            max_memory_allocated=_record("max_memory_allocated", 1234),
            reset_peak_memory_stats=_record("reset_peak_memory_stats"),
            get_device_name=_record("get_device_name", "Ascend910B4"),
            utils=types.SimpleNamespace(get_cann_version=_record("get_cann_version", "8.0.RC2")),
        )
    """,
    "torch_npu/contrib/__init__.py": "",
    "torch_npu/contrib/transfer_to_npu.py": """
        import torch_npu
        torch_npu.CALLS.append(("transfer_to_npu applied",))
    """,
}


@pytest.fixture
def fake_torch_npu(tmp_path, monkeypatch):
    """A torch_npu package on sys.path that records what was called, in order; removed again afterwards."""
    for rel, text in FAKE_TORCH_NPU.items():
        path = tmp_path / "fake" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    yield tmp_path / "fake"
    for name in [n for n in sys.modules if n == "torch_npu" or n.startswith("torch_npu.")]:
        del sys.modules[name]


def calls():
    return [c[0] for c in sys.modules["torch_npu"].CALLS]


def test_npu_wiring_imports_applies_transfer_then_configures(fake_torch_npu):
    assert "torch_npu" not in sys.modules  # nothing imported it before the NPU was asked for
    device = devices.resolve_device("npu:1")
    assert (device.type, device.index, str(device)) == ("npu", 1, "npu:1")
    assert "torch_npu.contrib.transfer_to_npu" in sys.modules  # applied by importing it
    log = sys.modules["torch_npu"].CALLS
    names = calls()
    assert names.index("transfer_to_npu applied") < names.index("set_compile_mode") < names.index("set_device")
    assert ("set_compile_mode", ("jit_compile", False)) in log
    assert ("set_device", 1) in log


def test_npu_jit_compile_flag_is_passed(fake_torch_npu):
    devices.resolve_device("npu", jit_compile=True)
    assert ("set_compile_mode", ("jit_compile", True)) in sys.modules["torch_npu"].CALLS


def test_auto_prefers_npu_when_torch_npu_sees_a_device(fake_torch_npu):
    assert devices.resolve_device("auto") == devices.Device("npu", 0)
    assert "transfer_to_npu applied" in calls()


def test_npu_index_beyond_visible_devices_is_a_user_error(fake_torch_npu):
    with pytest.raises(errors.UserError, match="only 2 NPU"):
        devices.resolve_device("npu:5")
    assert "transfer_to_npu applied" not in calls()


def test_backend_helpers_go_to_torch_npu(fake_torch_npu):
    device = devices.resolve_device("npu:0")
    devices.synchronize(device)
    devices.reset_peak_memory(device)
    assert devices.peak_memory_bytes(device) == 1234
    assert devices.device_name(device) == "Ascend910B4"
    env = devices.environment(device)
    assert (env.torch_npu, env.cann, env.device_name) == ("2.5.1.fake", "8.0.RC2", "Ascend910B4")
    log = sys.modules["torch_npu"].CALLS
    assert ("synchronize", 0) in log and ("reset_peak_memory_stats", 0) in log and ("max_memory_allocated", 0) in log


def test_importing_common_never_imports_torch_npu(fake_torch_npu):
    env = {**os.environ, "PYTHONPATH": f"{fake_torch_npu}{os.pathsep}{ROOT}"}
    code = "import sys, common, inference; print('torch_npu' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_npu_without_torch_npu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(errors.UserError, match="torch_npu is not installed"):
        devices.resolve_device("npu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "npu0", "tpu", "auto:1", "cpu:3"])
def test_bad_device_strings(spec):
    with pytest.raises(errors.UserError):
        devices.resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_absent_cuda_is_a_clear_error():
    with pytest.raises(errors.UserError, match="no CUDA device"):
        devices.resolve_device("cuda")


def test_cpu_device_and_its_helpers():
    device = devices.resolve_device("cpu")
    assert device == devices.Device("cpu") and device.torch == torch.device("cpu")
    devices.synchronize(device)  # a no-op, but callable
    assert devices.peak_memory_bytes(device) > 10_000_000  # peak RSS of this process


# ------------------------------------------------------------------------------------------------ model loading


def test_loads_tiny_folder(tiny_model_dir):
    loaded = models.load_model(str(tiny_model_dir), devices.Device("cpu"))
    assert not loaded.model.training
    assert loaded.source["weights"] == "model.safetensors" and len(loaded.source["sha256"]) == 64
    assert loaded.id2label[3] == "class 3"


def test_loads_pytorch_model_bin(tmp_path):
    from transformers import MobileViTForImageClassification

    model = MobileViTForImageClassification(tiny_config())
    model.config.save_pretrained(str(tmp_path))  # transformers 5 writes only safetensors; write the legacy file by hand
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = models.load_model(str(tmp_path))
    assert loaded.source["weights"] == "pytorch_model.bin"
    assert torch.equal(loaded.model.classifier.weight, model.classifier.weight)


def test_missing_folder(tmp_path):
    with pytest.raises(errors.UserError, match="does not exist"):
        models.load_model(str(tmp_path / "nope"))


def test_folder_without_weights_names_the_download_command(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(errors.UserError, match="download apple/mobilevit-x-small --local-dir"):
        models.load_model(str(model_copy))


def test_mobilevit_weights_under_another_family_config(model_copy):
    # any image classifier loads now (issue 30): MobileViT weights under a ViT config.json are refused by their tensors
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "vit"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.UserError, match=r"do not fit the shapes config.json gives: classifier.weight"):
        models.load_model(str(model_copy))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_weights(model_copy, damage):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00garbage" * 100 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(errors.UserError, match="corrupt, truncated or mismatched"):
        models.load_model(str(model_copy))


def test_hub_id_offline_gives_the_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(errors.UserError, match="could not download apple/mobilevit-x-small.*--local-dir ./model"):
        models.load_model("apple/mobilevit-x-small")


def test_default_folder_without_weights_tries_the_hub(monkeypatch, tmp_path):
    shutil.copytree(ROOT / "model", tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(errors.UserError, match="could not download apple/mobilevit-x-small"):
        models.load_model("./model")


def test_committed_model_config_is_x_small():
    cfg = json.loads((ROOT / "model" / "config.json").read_text())
    assert cfg["hidden_sizes"] == [96, 120, 144]
    assert cfg["neck_hidden_sizes"] == [16, 32, 48, 64, 80, 96, 384]
    assert len(cfg["id2label"]) == 1000 and cfg["id2label"]["281"] == "tabby, tabby cat"
    pre = preprocessing.PreprocessConfig.from_folder(ROOT / "model")
    assert (pre.shortest_edge, pre.crop_height, pre.crop_width, pre.resample) == (288, 256, 256, 2)
    assert pre.do_flip_channel_order


# ------------------------------------------------------------------------------------------------ preprocessing

LEGACY = {"size": 288, "crop_size": 256, "resample": 2, "do_flip_channel_order": True, "do_center_crop": True}
CURRENT = {
    "size": {"shortest_edge": 288},
    "crop_size": {"height": 256, "width": 256},
    "resample": 2,
    "do_flip_channel_order": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
}


def transformers_processor(cfg: dict):
    import transformers

    cls = getattr(transformers, "MobileViTImageProcessorPil", None) or transformers.MobileViTImageProcessor
    return cls(**cfg)


def test_both_config_forms_parse_alike():
    assert preprocessing.PreprocessConfig.from_dict(LEGACY) == preprocessing.PreprocessConfig.from_dict(CURRENT)


@pytest.mark.parametrize("form", [LEGACY, CURRENT], ids=["legacy", "current"])
@pytest.mark.parametrize("photo", PHOTOS, ids=[Path(p).name for p in PHOTOS])
def test_preprocessing_equals_transformers(photo, form):
    from transformers.image_utils import load_image

    expected = transformers_processor(form)(load_image(photo), return_tensors="np")["pixel_values"][0]
    ours = preprocessing.preprocess(photo, preprocessing.PreprocessConfig.from_dict(form))
    assert ours.dtype == np.float32 and ours.shape == expected.shape == (3, 256, 256)
    assert np.abs(ours - expected).max() <= 1e-6


def test_batch_conversion_maps_every_byte_as_one_float32_multiply():
    cfg = preprocessing.PreprocessConfig()
    values = torch.arange(256, dtype=torch.uint8)
    crops = torch.stack([values.roll(i).reshape(4, 64) for i in range(3)], dim=-1)[None]  # [1, 4, 64, 3]: every byte
    x = preprocessing.to_input(crops, cfg)
    assert x.dtype == torch.float32 and x.shape == (1, 3, 4, 64) and x.is_contiguous()
    expected = np.float32(crops.numpy().transpose(0, 3, 1, 2)) * np.float32(1 / 255)
    assert np.array_equal(x.numpy(), expected)
    unscaled = preprocessing.to_input(crops, dataclasses.replace(cfg, do_rescale=False))
    assert torch.equal(unscaled, crops.permute(0, 3, 1, 2).float())


def test_exif_orientation_is_applied(tmp_path):
    from transformers.image_utils import load_image

    image = Image.open(PHOTOS[0]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    ours = preprocessing.load_image(path)
    assert ours.size == (image.height, image.width)
    assert np.array_equal(np.asarray(ours), np.asarray(load_image(str(path))))


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGBA", "CMYK", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    base = Image.open(PHOTOS[0]).convert("RGB").resize((64, 48))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    elif mode == "F":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.float32) / 255.0)
    else:
        image = base.convert(mode)
    assert image.mode == mode
    rgb = preprocessing.to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (64, 48)
    if mode in ("I;16", "F", "L"):  # high-depth greyscale is scaled to 8 bits, not clipped to white
        assert np.abs(np.asarray(rgb)[..., 0].astype(int) - np.asarray(base.convert("L"))).max() <= 1


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert preprocessing.to_rgb(image).getpixel((0, 0)) == (255, 255, 255)


def test_decompression_bomb_guard_stays_on(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(OSError, match="decompression-bomb"):
        preprocessing.load_image(PHOTOS[0])


def test_truncated_and_non_images_are_oserrors(tmp_path):
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(PHOTOS[0]).read_bytes()[:5000])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    for path in (truncated, text, tmp_path / "missing.png"):
        with pytest.raises(OSError):
            preprocessing.load_image(path)


def test_expand_images(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    got = preprocessing.expand_images([str(tmp_path), str(tmp_path / "*.png"), "http://x/y.jpg", "missing.png"])
    assert got == [  # b.png, named by the folder and by the glob, is one image
        str(tmp_path / "a.jpg"),
        str(tmp_path / "b.png"),
        "http://x/y.jpg",
        "missing.png",
    ]


# ------------------------------------------------------------------------------------------------ synthetic weights


def test_synthetic_x_small_has_healthy_activations():
    model = synthetic.build_synthetic_model()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(2.32e6, rel=0.01)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) for m in norms)
    means = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: means.append(out.abs().mean().item()))
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    cfg = preprocessing.PreprocessConfig()
    batch = torch.stack([torch.from_numpy(preprocessing.preprocess(p, cfg)) for p in PHOTOS])
    with torch.no_grad():
        logits = model(pixel_values=batch).logits
    for hook in hooks:
        hook.remove()
    assert min(means) > 1e-2, "an activation died"
    assert 2.0 < logits.std(dim=1).mean() < 4.0
    assert len(set(logits.argmax(dim=1).tolist())) >= 3, "every photo gets the same class"
    # transformers' own init, for contrast: the trap the synthetic weights avoid
    from transformers import MobileViTForImageClassification

    torch.manual_seed(0)
    with torch.no_grad():
        dead = MobileViTForImageClassification(synthetic.x_small_config()).eval()(pixel_values=batch[:1]).logits
    assert dead.std() < 0.05 * logits.std()


def test_synthetic_weights_are_deterministic(tmp_path):
    a = synthetic.build_synthetic_model(config=tiny_config(), images=PHOTOS[:1], seed=3)
    b = synthetic.build_synthetic_model(config=tiny_config(), images=PHOTOS[:1], seed=3)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


# ------------------------------------------------------------------------------------------------ reports


def test_write_json_atomic(tmp_path):
    path = tmp_path / "report.json"
    reports.write_json_atomic(path, {"x": float("nan"), "y": np.float32(1.5), "z": [float("inf")]})
    assert json.loads(path.read_text()) == {"x": None, "y": 1.5, "z": [None]}
    with pytest.raises(TypeError):
        reports.write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text())["y"] == 1.5  # the old report survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # and no temp file is left


def test_run_main_turns_user_errors_into_exit_2(capsys):
    def body(argv):
        raise errors.UserError("no such thing")

    assert common.run_main(body) == 2
    assert capsys.readouterr().err == "error: no such thing\n"


def test_environment_names_versions():
    env = dataclasses.asdict(devices.environment(devices.Device("cpu")))  # a typed schema.Environment
    assert env["torch"] == torch.__version__ and env["transformers"] and env["cpu_count"] >= 1
    assert env["torch_npu"] is None and env["cann"] is None
    assert json.loads(json.dumps(env, allow_nan=False)) == env  # strict JSON, nothing lost


# --------------------------------------------------------------------------------------------------------------------
# The output guard (common.check_outputs)
# --------------------------------------------------------------------------------------------------------------------


def test_output_guard_refuses_inputs_model_files_and_twin_outputs(tmp_path, model_copy):
    image = tmp_path / "cat.png"
    image.write_bytes(b"x")
    (tmp_path / "alias.json").symlink_to(image)
    common.check_outputs({"--output": str(tmp_path / "new.json")}, {"--images": [str(image)]}, model_copy)
    common.check_outputs({"--output": str(tmp_path / "new.json")})  # the one-argument form still works
    cases = [
        ({"--output": str(image)}, {"--images": [str(image)]}, None, "is the input --images"),
        ({"--output": str(tmp_path / "alias.json")}, {"--images": [str(image)]}, None, "is the input --images"),
        ({"--output": str(model_copy / "new.json")}, {}, model_copy, "inside the model folder"),
        (
            {"REPORT.json": str(tmp_path / "r.json"), "--plot": str(tmp_path / "." / "r.json")},
            {},
            None,
            "are the same file",
        ),
        ({"--output": ""}, {}, None, "empty path"),
    ]
    for outputs, inputs, model_dir, message in cases:
        with pytest.raises(errors.UserError, match=message) as refused:
            common.check_outputs(outputs, inputs, model_dir)
        assert "\n" not in str(refused.value)
    os.link(model_copy / "config.json", tmp_path / "config.json")  # a hard link to a model file, elsewhere
    with pytest.raises(errors.UserError, match="model folder"):
        common.check_outputs({"--output": str(tmp_path / "config.json")}, {}, model_copy)
    common.check_outputs({"--output": "/dev/null", "--plot": "/dev/null"})  # streams destroy nothing


def test_checkpoint_keys_are_all_there_or_named(model_copy):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(model_copy / "model.safetensors"))
    weights["classifier.extra"] = torch.zeros(2)
    save_file(weights, str(model_copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(errors.UserError, match="1 tensor\\(s\\) the model does not have: classifier.extra"):
        models.load_model(str(model_copy))


def test_require_regular_file_refuses_devices_and_fifos(tmp_path):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    for path in (fifo, tmp_path / "zero.png", tmp_path):
        with pytest.raises(OSError, match="not a regular file"):
            preprocessing.require_regular_file(path)
        with pytest.raises(OSError, match="not a regular file"):
            preprocessing.load_image(str(path)) if path != tmp_path else models.sha256_file(path)
