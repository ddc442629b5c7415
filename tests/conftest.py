"""Shared fixtures: tiny and full-size MobileViT folders built in-process and saved, then loaded the real way."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# The suite builds into a temp folder of its own (every process it starts inherits it), never into the user's shared
# /tmp/torchinductor_<user>, and removes it at the end (pytest_sessionfinish). Set before torch is imported.
_SUITE_TMP = tempfile.mkdtemp(prefix="mobilevit-npu-tests-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_SUITE_TMP, "inductor")
os.environ["TRITON_CACHE_DIR"] = os.path.join(_SUITE_TMP, "triton")

import pytest  # noqa: E402
import torch  # noqa: E402

from mobilevit_npu import compilers, refcache, synthetic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def pytest_sessionfinish(session, exitstatus):
    """The suite's own inductor/triton builds go with it (the pytest tmp folders: tmp_path_retention_policy)."""
    shutil.rmtree(_SUITE_TMP, ignore_errors=True)


DATA_DIR = ROOT / "mobilevit_npu" / "data" / "images"  # the sample photos the package ships
PHOTOS = sorted(str(p) for p in DATA_DIR.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


@pytest.fixture(autouse=True)
def private_caches(tmp_path_factory, monkeypatch):
    """Each test gets empty reference and compile caches of its own: none touches the user's, none sees another's."""
    monkeypatch.setenv(refcache.CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv(compilers.COMPILE_CACHE_ENV, raising=False)


def tiny_config(num_labels: int = 10):
    from transformers import MobileViTConfig

    return MobileViTConfig(
        image_size=256,
        patch_size=2,
        hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 48],
        num_attention_heads=2,
        mlp_ratio=2.0,
        expand_ratio=2.0,
        id2label={i: f"class {i}" for i in range(num_labels)},
        label2id={f"class {i}": i for i in range(num_labels)},
    )


def save_folder(model, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    shutil.copy(ROOT / "model" / "preprocessor_config.json", folder / "preprocessor_config.json")
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny MobileViT (10 classes) with healthy synthetic weights, saved as a Hugging Face folder."""
    torch.manual_seed(0)
    model = synthetic.build_synthetic_model(config=tiny_config(), images=PHOTOS[:2])
    return save_folder(model, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def default_init_model_dir(tmp_path_factory) -> Path:
    """A tiny MobileViT with transformers' own random init: logits ~0, the trap that must never PASS a check."""
    from transformers import MobileViTForImageClassification

    torch.manual_seed(0)
    return save_folder(MobileViTForImageClassification(tiny_config()).eval(), tmp_path_factory.mktemp("default_init"))


@pytest.fixture(scope="session")
def synthetic_model_dir(tmp_path_factory) -> Path:
    """The full-size X-Small with healthy synthetic weights (1000 ImageNet labels), saved and loadable."""
    return synthetic.save_synthetic_model(tmp_path_factory.mktemp("xsmall"))


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir) -> Path:
    """A writable copy of the tiny folder, for tests that damage it."""
    dest = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dest)
    return dest


def read_json(path) -> dict:
    """A JSON file; a report (it names the `tool` that wrote it) is first checked against its kind's definition in
    mobilevit_npu.schema, so every test that reads a report also checks the writer kept to the format."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if isinstance(data, dict) and "tool" in data:
        from mobilevit_npu import schema

        schema.validate(data, str(path))
    return data
