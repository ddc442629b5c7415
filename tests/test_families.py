"""The model matrix (issue 30): a tiny config per image-classifier family, built with synthetic healthy weights and
saved the real way (the model's and the image processor's save_pretrained) once per session, then run through every
script: inference.py, accuracy_run.py, accuracy_run_perf.py, export_onnx.py, port_report.py. Plus the family seam
itself (mobilevit_npu/families.py): resolution, refusals, the fast-path gate, MobileViTV2's export restatement.

A family whose preprocessing the toolkit does not yet restate (preprocessing.preprocess_image differs from the
folder's own AutoImageProcessor on a photo, or refuses the config) is an xfail naming the processor: the test then
checks nothing it cannot judge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PHOTOS, read_json, tiny_config
from perturb import add_noise, perturb_targets

import accuracy_run
import accuracy_run_perf
import export_onnx
import inference
import port_report
from mobilevit_npu import devices, execution, families, models, onnx_export, preprocessing, synthetic
from mobilevit_npu.errors import Unavailable, UserError

LABELS = {i: f"class {i}" for i in range(10)}
S = 32  # the tiny input size (MobileViT's need 64: five stride-2 stages and 2x2 patches)


def _labels(**extra):
    return {"id2label": dict(LABELS), "label2id": {v: k for k, v in LABELS.items()}, **extra}


def _configs():
    import transformers as T

    return {
        # name: (config, processor, a module whose output a broken port would change)
        "mobilevit": (
            lambda: tiny_config(image_size=64),  # the fixtures' tiny MobileViT (10 classes), at 64x64
            lambda: T.MobileViTImageProcessor(size={"shortest_edge": 72}, crop_size={"height": 64, "width": 64}),
            "mobilevit.encoder.layer.1",
        ),
        "mobilevitv2": (
            lambda: T.MobileViTV2Config(
                image_size=64,
                width_multiplier=0.25,
                n_attn_blocks=[1, 1, 1],
                base_attn_unit_dims=[16, 24, 32],
                **_labels(),
            ),
            lambda: T.MobileViTImageProcessor(size={"shortest_edge": 72}, crop_size={"height": 64, "width": 64}),
            "mobilevitv2.encoder.layer.1",
        ),
        "vit": (
            lambda: T.ViTConfig(
                image_size=S,
                patch_size=8,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                **_labels(),
            ),
            lambda: T.ViTImageProcessor(size={"height": S, "width": S}),
            ("vit.layers.0", "vit.encoder.layer.0"),  # transformers 5, 4.x
        ),
        "deit": (
            lambda: T.DeiTConfig(
                image_size=S,
                patch_size=8,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                **_labels(architectures=["DeiTForImageClassification"]),
            ),
            lambda: T.DeiTImageProcessor(size={"height": 36, "width": 36}, crop_size={"height": S, "width": S}),
            ("deit.layers.0", "deit.encoder.layer.0"),
        ),
        "swin": (
            lambda: T.SwinConfig(
                image_size=S, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, **_labels()
            ),
            lambda: T.ViTImageProcessor(size={"height": S, "width": S}),
            "swin.encoder.layers.0",
        ),
        "convnext": (
            lambda: T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=S, **_labels()),
            lambda: T.ConvNextImageProcessor(size={"shortest_edge": S}, crop_pct=0.875),
            "convnext.encoder.stages.0",
        ),
        "resnet": (
            lambda: T.ResNetConfig(
                embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", **_labels()
            ),
            lambda: T.ConvNextImageProcessor(size={"shortest_edge": S}, crop_pct=0.875),
            "resnet.encoder.stages.0",
        ),
        "efficientnet": (
            # hidden_dim must be round_filters(1280) at this width (EfficientNetConfig's default is B7's 2560)
            lambda: T.EfficientNetConfig(
                image_size=S, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128, **_labels()
            ),
            lambda: T.EfficientNetImageProcessor(size={"height": S, "width": S}),
            "efficientnet.encoder.blocks.1",
        ),
        "mobilenet_v2": (
            lambda: T.MobileNetV2Config(
                image_size=S, depth_multiplier=0.25, min_depth=8, finegrained_output=False, **_labels()
            ),
            lambda: T.MobileNetV2ImageProcessor(size={"shortest_edge": 36}, crop_size={"height": S, "width": S}),
            "mobilenet_v2.layer.1",
        ),
    }


# Tiny configs this narrow round too much in bfloat16 weights (cosine 0.84-0.96 against float32: few channels,
# BatchNorm statistics of 2x2 maps): their bf16 PASS is checked on full-size configs, under slow, below. The tiny
# folder runs accuracy_run.py with a channels-last float32 target instead.
BF16_FULL_SIZE = {
    "mobilevit": lambda T: T.MobileViTConfig(
        hidden_sizes=[64, 80, 96], neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320], expand_ratio=2.0, **_labels()
    ),  # apple/mobilevit-xx-small's shape
    "mobilevitv2": lambda T: T.MobileViTV2Config(width_multiplier=0.5, **_labels()),  # apple/mobilevitv2-0.5's
    "mobilenet_v2": lambda T: T.MobileNetV2Config(depth_multiplier=0.35, **_labels()),  # mobilenet_v2_0.35_96's
}
NAMES = ["mobilevit", "mobilevitv2", "vit", "deit", "swin", "convnext", "resnet", "efficientnet", "mobilenet_v2"]


def _preprocessing_gap(folder: Path) -> str | None:
    """None when preprocessing.preprocess_image equals the folder's own AutoImageProcessor (as this transformers
    builds it) on a photo, else why not."""
    from transformers import AutoImageProcessor

    image = preprocessing.load_image(PHOTOS[0])
    processor = AutoImageProcessor.from_pretrained(str(folder))
    name = type(processor).__name__
    try:
        ours = preprocessing.preprocess_image(image, preprocessing.PreprocessConfig.from_folder(folder))
    except UserError as exc:
        return f"preprocessing refuses {name}'s config ({exc}); restated per processor class by issue 30's H5 part"
    ref = processor(images=image, return_tensors="np")["pixel_values"][0]
    if ours.shape != ref.shape or float(np.abs(ours - ref).max()) > 1e-5:
        return f"preprocessing does not equal {name} yet (shape {ours.shape} vs {ref.shape}); restated by H5"
    return None


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory):
    """name -> (folder, None) or (None, why its preprocessing is not restated yet); each built once, on demand."""
    built: dict[str, tuple[Path | None, str | None]] = {}
    configs = _configs()

    def get(name: str) -> Path:
        if name not in built:
            make_config, make_processor, _ = configs[name]
            folder = tmp_path_factory.mktemp(f"family_{name}")
            processor = make_processor()
            processor.save_pretrained(str(folder))
            gap = _preprocessing_gap(folder)
            if gap is None:
                torch.manual_seed(0)
                synthetic.save_synthetic(folder, make_config(), processor, images=PHOTOS[:2])
            built[name] = (None if gap else folder, gap)
        folder, gap = built[name]
        if gap:
            pytest.xfail(gap)
        return folder

    return get


@pytest.fixture(params=NAMES)
def family(request, family_folders) -> tuple[str, Path]:
    return request.param, family_folders(request.param)


@pytest.fixture(scope="session")
def family_reports(tmp_path_factory, family_folders):
    """name -> (accuracy report path, perf report path): accuracy_run.py with a bf16 target and accuracy_run_perf.py
    (eager, and fast, which only MobileViT has), once per family."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        folder = family_folders(name)
        if name not in made:
            out = tmp_path_factory.mktemp(f"reports_{name}")
            acc, perf = out / "accuracy_report.json", out / "perf_report.json"
            target = ["--target_mode", "channels_last"] if name in BF16_FULL_SIZE else ["--dtype", "bf16"]
            argv = ["--allocator", "system", str(folder), str(acc), "--device", "cpu", *target]
            rc = accuracy_run.main([*argv, "--images", *PHOTOS[:2]])
            assert rc == 0, f"{name}: a {' '.join(target)} target should PASS"
            modes = (
                "eager"
                if families.resolve(json.loads((folder / "config.json").read_text())).fast_path
                else "eager,fast"
            )
            perf_argv = [str(folder), "3", str(perf), "--device", "cpu", "--modes", modes, "--warmup", "1"]
            rc = accuracy_run_perf.main(["--allocator", "system", *perf_argv])
            assert rc == 0
            made[name] = (acc, perf)
        return made[name]

    return get


# --------------------------------------------------------------------------------------------------------------------
# The seam
# --------------------------------------------------------------------------------------------------------------------


def test_every_declared_family_resolves_and_is_an_auto_image_classifier():
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    for family in families.FAMILIES:
        for model_type in family.model_types:
            assert model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
            assert families.resolve({"model_type": model_type}) is family
    assert [f.name for f in families.FAMILIES if f.fast_path] == ["mobilevit"]
    assert {f.fastest_exact_mode for f in families.FAMILIES if not f.fast_path} == {"compiled"}
    generic = families.resolve({"model_type": "poolformer"})  # undeclared, but transformers maps it
    assert not generic.known and generic.fastest_exact_mode == "compiled"


def _folder_of(tmp_path: Path, config: dict) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return folder


def test_a_model_type_that_is_no_image_classifier_is_one_line(tmp_path, capsys):
    folder = _folder_of(tmp_path, {"model_type": "bert", "architectures": ["BertModel"]})
    rc = inference.main(
        ["--allocator", "system", "--model_path", str(folder), "--images", PHOTOS[0], "--device", "cpu"]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "model_type 'bert' is not an image classifier" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_random_init_is_dead_where_synthetic_weights_are_healthy():
    """transformers' init gives ~0 logits for MobileViT, EfficientNet and MobileNetV2; the synthetic weights spread
    them as a trained model's (std ~3 across classes) and differ image to image. (Calibrated here on MobileViT's
    default preprocessing, which these size-agnostic convnets take; the matrix below uses each family's own.)"""
    from transformers import AutoModelForImageClassification

    configs = _configs()
    small = preprocessing.PreprocessConfig(shortest_edge=72, crop_height=64, crop_width=64)  # MobileViT's rules
    x = torch.stack([torch.from_numpy(preprocessing.preprocess(photo, small)) for photo in PHOTOS[:2]])
    for name in ("mobilevit", "efficientnet", "mobilenet_v2"):
        make_config = configs[name][0]
        torch.manual_seed(0)
        with torch.no_grad():
            dead = AutoModelForImageClassification.from_config(make_config()).eval()(pixel_values=x).logits
            model = synthetic.build_synthetic_model(make_config(), images=PHOTOS[:2], preprocess=small)
            healthy = model(pixel_values=x).logits
        assert float(dead.std()) < 1e-3, name
        assert 1.0 < float(healthy.std(dim=1).mean()) < 10.0, name
        assert float((healthy[0] - healthy[1]).abs().max()) > 0.1, name


def test_synthetic_weights_are_healthy_for_every_family(family):
    name, folder = family
    loaded = models.load_model(str(folder), devices.Device("cpu"))
    assert loaded.family is families.resolve({"model_type": name})
    items, _ = preprocessing.read_images(PHOTOS[:3], loaded.preprocess)
    with torch.no_grad():
        logits = loaded.model(pixel_values=torch.stack([i.pixels for i in items])).logits
    assert 1.0 < float(logits.std(dim=1).mean()) < 10.0  # spread across classes as a trained model's
    assert float((logits[0] - logits[1]).abs().max()) > 0.1  # and it looks at its input


def test_fast_is_mobilevits_and_others_are_told_compiled(family_folders):
    batch = torch.zeros(1, 3, S, S)
    folder = family_folders("vit")
    loaded = models.load_model(str(folder), devices.Device("cpu"))
    with pytest.raises(Unavailable, match="ViT's fastest exact mode is compiled"):
        execution.prepare_mode("fast", loaded.model, devices.Device("cpu"), "fp32", batch)
    mobilevit = models.load_model(str(family_folders("mobilevit")), devices.Device("cpu"))
    assert mobilevit.family.fastest_exact_mode == "fast"


def test_mobilevitv2_fold_is_restated_for_the_export_and_exact(family_folders):
    """transformers' MobileViTV2Layer.unfolding/folding (nn.functional.unfold/fold: aten::col2im, opset 18 only)
    against the restatement used for the export, on a map that is and one that is not a whole number of patches."""
    loaded = models.load_model(str(family_folders("mobilevitv2")), devices.Device("cpu"))
    model = loaded.model
    for size in (64, 72):
        x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            want = model(pixel_values=x).logits
            with families.for_model(model).export_patch(model):
                got = model(pixel_values=x).logits
        assert torch.equal(want, got)
    assert not any("folding" in m.__dict__ for m in model.modules())  # removed after the export


def test_an_operator_past_atcs_opsets_is_refused_naming_it(tmp_path):
    class Fold(torch.nn.Module):
        def forward(self, x):
            patches = torch.nn.functional.unfold(x, kernel_size=2, stride=2)
            return torch.nn.functional.fold(patches, output_size=x.shape[-2:], kernel_size=2, stride=2).mean((2, 3))

    class Wrapper(torch.nn.Module):  # execution.Logits calls model(pixel_values=...).logits
        def __init__(self):
            super().__init__()
            self.inner = Fold()

        def forward(self, pixel_values):
            return type("Out", (), {"logits": self.inner(pixel_values)})()

    with pytest.raises(UserError, match=r"aten::col2im needs opset 18, ATC takes 11-15"):
        onnx_export.export_onnx(Wrapper(), tmp_path / "fold.onnx", image_size=(8, 8), exporter="torchscript")


# --------------------------------------------------------------------------------------------------------------------
# The matrix: every family through every script
# --------------------------------------------------------------------------------------------------------------------


def test_inference_equals_the_transformers_pipeline(family, tmp_path):
    from transformers import pipeline

    name, folder = family
    out = tmp_path / "predictions.json"
    argv = ["--allocator", "system", "--model_path", str(folder), "--images", *PHOTOS[:2], "--device", "cpu"]
    rc = inference.main([*argv, "--output", str(out)])
    assert rc == 0
    report = read_json(out)
    classify = pipeline("image-classification", model=str(folder), device="cpu")
    for result, photo in zip(report["results"], PHOTOS[:2]):
        expected = classify(preprocessing.load_image(photo), top_k=5)
        assert [p["label"] for p in result["predictions"]] == [e["label"] for e in expected]
        for p, e in zip(result["predictions"], expected):
            assert abs(p["probability"] - e["score"]) <= 1e-4


def test_accuracy_bf16_passes_and_the_perf_report_names_the_fastest_mode(family, family_reports):
    name, _ = family
    acc, perf = family_reports(name)
    report = read_json(acc)
    assert report["verdict"] == "PASS"
    bench = read_json(perf)
    modes = {r["mode"]: r for r in bench["results"]}
    assert modes["eager"]["status"] == "ok"
    if name != "mobilevit":
        assert modes["fast"]["status"] == "unavailable"
        assert "fastest exact mode is compiled" in modes["fast"]["reason"]


def test_a_broken_layer_fails_naming_it(family, tmp_path, monkeypatch):
    name, folder = family
    names = dict(models.load_model(str(folder)).model.named_modules())
    wanted = _configs()[name][2]
    layer = next(n for n in ((wanted,) if isinstance(wanted, str) else wanted) if n in names)
    perturb_targets(monkeypatch, add_noise(layer, scale=1.0))
    report = tmp_path / "report.json"
    argv = ["--allocator", "system", str(folder), str(report), "--device", "cpu", "--images", *PHOTOS[:2], "--layers"]
    rc = accuracy_run.main(argv)
    assert rc == 1
    data = read_json(report)
    assert data["verdict"] == "FAIL"
    assert data["layers"]["first_divergent"]["name"] == layer


def test_export_onnx_agrees_with_onnx_runtime_and_its_aipp_is_the_processor(family, tmp_path):
    from test_onnx_export import apply_aipp, parse_aipp

    name, folder = family
    out = tmp_path / "model.onnx"
    argv = [str(folder), str(out), "--images", *PHOTOS[:2], "--aipp"]
    rc = export_onnx.main(argv)
    assert rc == 0
    report = read_json(out.with_suffix(".json"))
    assert report["check"]["verdict"] == "PASS"
    lo, hi = onnx_export.ATC_OPSETS
    assert lo <= report["onnx"]["opset"] <= hi
    # the AIPP config, applied by the CANN guide's formula to the host's uint8 crop, is the processor's output
    cfg = preprocessing.PreprocessConfig.from_folder(folder)
    config = parse_aipp(out.with_suffix(".aipp.cfg").read_text(encoding="utf-8"))
    for photo in PHOTOS[:2]:
        want = preprocessing.preprocess(photo, cfg)
        host = onnx_export.aipp_host_input(torch.from_numpy(want)[None], cfg)
        np.testing.assert_allclose(apply_aipp(config, host)[0], want, rtol=0, atol=1e-5)


def test_port_report_card_facts_match_the_config(family, family_reports, tmp_path, monkeypatch):
    name, folder = family
    acc, perf = family_reports(name)
    monkeypatch.chdir(tmp_path)
    rc = port_report.main([str(acc), str(perf), "--lang", "en"])
    assert rc == 0
    card = (tmp_path / "MODEL_CARD.md").read_text(encoding="utf-8")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    loaded = models.load_model(str(folder))
    parameters = sum(p.numel() for p in loaded.model.parameters())
    assert f"| {parameters:,} |" in card
    assert f"`{config['architectures'][0]}`" in card
    assert "| 10 |" in card  # classes
    assert "74.8%" not in card and "apple/mobilevit-x-small" not in card  # not that checkpoint: nothing published
    family_title = families.resolve(config).title
    assert card.split("---\n", 2)[-1].lstrip().startswith(f"# {family_title} on CPU")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BF16_FULL_SIZE))
def test_full_size_bf16_target_passes(name, tmp_path):
    import transformers as T

    folder = tmp_path / name
    processor = _configs()[name][1]()
    processor = type(processor)()  # the processor class's own defaults, at full size
    synthetic.save_synthetic(folder, BF16_FULL_SIZE[name](T), processor, images=PHOTOS)
    report = tmp_path / "report.json"
    argv = ["--allocator", "system", str(folder), str(report), "--device", "cpu", "--dtype", "bf16"]
    assert accuracy_run.main([*argv, "--images", *PHOTOS[:2]]) == 0
    assert read_json(report)["verdict"] == "PASS"


# --------------------------------------------------------------------------------------------------------------------
# MobileViT's sizes: the fast path restates each exactly
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "hidden, neck, expand",
    [
        ([64, 80, 96], [16, 16, 24, 48, 64, 80, 320], 2.0),  # apple/mobilevit-xx-small
        ([96, 120, 144], [16, 32, 48, 64, 80, 96, 384], 4.0),  # apple/mobilevit-x-small
        ([144, 192, 240], [16, 32, 64, 96, 128, 160, 640], 4.0),  # apple/mobilevit-small
    ],
    ids=["xx-small", "x-small", "small"],
)
def test_mobilevit_sizes_take_the_fast_path_exactly(hidden, neck, expand):
    from transformers import MobileViTConfig

    from mobilevit_npu import fastpath

    config = MobileViTConfig(hidden_sizes=hidden, neck_hidden_sizes=neck, expand_ratio=expand)
    model = synthetic.build_synthetic_model(config, images=PHOTOS[:1])
    assert families.for_model(model).fast_path
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(pixel_values=x).logits
        got = fastpath.build_fast_model(model, channels_last=False)(x)
    assert torch.nn.functional.cosine_similarity(want, got).min() > 0.99999
    assert torch.equal(want.argmax(1), got.argmax(1))
