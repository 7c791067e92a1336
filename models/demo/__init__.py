"""The demo model: a small HunyuanVideo (preset ``hunyuan-video-demo``) trained by
``scripts/train_demo.py`` on the procedural videos of ``grammar``, written in the release's folder
layout (``transformers/``, ``vae/``) and loaded by ``--model-dir`` like any checkpoint. Its trained
weights are to ship in ``WEIGHTS_DIR`` (not yet there: docs/DEMO_MODEL.md)."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "hunyuan-video-demo"
