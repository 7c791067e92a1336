"""The demo model: a small HunyuanVideo (preset ``hunyuan-video-demo``) trained here on the
procedural videos of ``grammar``, shipped in ``hunyuan-video-demo/`` in the release's folder layout
(``transformers/``, ``vae/``) and loaded by ``--model-dir`` like any checkpoint."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "hunyuan-video-demo"
