"""Wan2.1 text-to-video (1.3B and 14B): the DiT, the umT5 text encoder, the causal 3D VAE and the
flow-matching UniPC sampler, in the release's and diffusers' checkpoint layouts. The launcher
reaches it only through ``models.family`` (``models/wan/family.py``)."""
