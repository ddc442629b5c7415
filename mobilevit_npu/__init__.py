"""mobilevit_npu: run, check and benchmark MobileViT-X-Small on Ascend NPU, CUDA and CPU.

The shared code of the scripts at the repository root, one module per concern (readme.md has the map).
"""

from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
