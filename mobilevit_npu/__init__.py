"""mobilevit_npu: run, check and benchmark MobileViT-X-Small on Ascend NPU, CUDA and CPU.

The shared code of the scripts at the repository root, one module per concern (readme.md has the map).
"""

from pathlib import Path

# What the package ships (package data): the sample photos, ImageNet's wnids, the X-Small config for --synthetic.
DATA_DIR = Path(__file__).resolve().parent / "data"
# The folder above the package: a git checkout when the code runs from one (reports record its commit), else
# site-packages. Nothing the code needs is read from here.
PROJECT_DIR = Path(__file__).resolve().parents[1]
