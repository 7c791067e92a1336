"""The model-family seam: what the launcher and parallel/ may know of a model, and nothing more.

A family (HunyuanVideo, later Wan2.1, a toy one in the tests) is one frozen ``ModelFamily``
registered here; ``get_family(preset)`` finds it. ``launcher/`` and ``parallel/`` talk to this API
only, never to a family's own module, so a new family is one folder under ``models/`` (plus its
topology YAML) and one ``register_family`` call.

The DiT of every family keeps the two contracts of the seam:

- tokens in, tokens out: ``dit(img [B, S, F], rope_cos [S, D], rope_sin [S, D], txt [B, L, T],
  txt_mask [B, L], timestep [B], pooled [B, P], guidance [B] | None) -> [B, S, F]``, with the image
  tokens patchified t-major (``family.patchify``) and ``dit.rope(grid)`` the RoPE rows of the
  whole grid, so that a shard is a slice of both;
- one joint attention, swapped by ``dit.set_attention(fn)`` (``parallel.parallelize`` does it);
- optionally, token chunking: ``family.set_token_chunk(dit, tokens)`` (the launcher does it when
  the memory plan asks), same result, lower peak.

A family's DiT config (``family.presets[name]``) answers: ``name``, ``num_heads``, ``head_dim``,
``hidden_size``, ``mlp_hidden``, ``in_channels``, ``guidance_embed``, ``latent_grid(h, w, f)``
and ``token_grid(h, w, f)``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .scheduler import FlowMatchEuler
from .step_cache import CacheSpec

# Out-of-tree families: modules named here (comma-separated) are imported before the first lookup,
# and each calls `register_family` (how the tests add a toy family without touching the launcher).
FAMILIES_ENV = "VIDEODIT_FAMILIES"


class ModelInputError(ValueError):
    """Weight folders or files that are missing or do not fit the model (bad input: exit 2)."""
GUIDANCE_KINDS = ("embedded", "cfg")


@dataclass(frozen=True, kw_only=True)
class PresetDefaults:
    """What `generate` uses for a preset when a flag is left out."""

    height: int
    width: int
    frames: int
    steps: int
    flow_shift: float = 7.0
    guidance: float = 6.0  # embedded (distilled) guidance, for a family that has it
    cfg_scale: float = 1.0  # classic CFG (1 = off): Wan's release runs 5.0 with a negative prompt
    negative_prompt: str | None = None  # this preset's negative prompt under CFG (None: the family's)
    fps: int = 24
    model_dir: Path | None = None  # weights shipped with the code: --model-dir when none is given


@dataclass(frozen=True, kw_only=True)
class VaeSpec:
    """A family's VAE as the launcher uses it.

    ``load(model_dir | None, dit_config, device, dtype)`` -> the VAE (seeded random weights of the
    preset's size without a folder); ``decode(vae, latents [1, C, T, h, w], tiling)`` -> video
    ``[3, F, H, W]`` in [-1, 1] on the CPU in the VAE's dtype; ``tilings``: the tiling names it
    accepts besides "off" (the first is the default, what "auto" means without a memory plan).
    Memory, for the planner: ``decode_bytes(latent (T, h, w), tiling)`` -> the decode's peak bytes
    above its weights; ``tile_shape(latent, tiling)`` -> the largest tile it decodes;
    ``weight_bytes(dit_config)`` -> its weights in ``dtype_on_gpu``; ``calibrated(dit_config)``:
    whether the decode model was measured for this preset's VAE; ``note(latent, tiling)`` -> an
    extrapolation the estimate makes, or None.

    Tiles for several ranks (``models.vae_tiles.TiledPass``: the tiles of the same grid and the
    same stitch as ``decode``, so shared tiles give the same frames): ``split_decode(vae, latents,
    tiling)`` for a tiling other than "off", its ``stitch`` giving what ``decode`` returns;
    ``split_encode(vae, video [3, F, H, W], tiling)``, its ``stitch`` giving DiT latents
    ``[1, C, T, h, w]`` on the CPU. None: the family's pass cannot be split (the first rank runs it)."""

    load: Callable[..., nn.Module]
    decode: Callable[[nn.Module, torch.Tensor, str], torch.Tensor]
    tilings: tuple[str, ...]
    split_decode: Callable[[nn.Module, torch.Tensor, str], Any] | None = None
    split_encode: Callable[[nn.Module, torch.Tensor, str], Any] | None = None
    decode_bytes: Callable[[tuple[int, int, int], str], int] = lambda latent, tiling: 0
    tile_shape: Callable[[tuple[int, int, int], str], tuple[int, int, int]] = lambda latent, tiling: latent
    weight_bytes: Callable[[Any], int] = lambda cfg: 0
    calibrated: Callable[[Any], bool] = lambda cfg: False
    note: Callable[[tuple[int, int, int], str], str | None] = lambda latent, tiling: None
    dtype_on_gpu: torch.dtype = torch.float16


@dataclass(frozen=True, kw_only=True)
class TextSpec:
    """A family's text encoder(s).

    ``load(model_dir | None, dit_config, device, dtype)`` -> an encoder whose ``encode([prompt])``
    gives a ``models.sampling.TextConditioning`` (the weightless built-in one without a folder);
    ``max_tokens``: text tokens the DiT sees; ``streamable(encoder)`` -> ``(resident modules,
    [(name, layer)])`` when its big layers may stream from host memory, else None;
    ``weight_bytes(streamed)`` -> its peak GPU bytes with weights loaded (0 for the built-in);
    ``has_weights(dit_config)``: whether a model directory brings this preset's encoder weights
    (False for a DiT trained on the built-in encoder, which it then uses with --model-dir too)."""

    load: Callable[..., Any]
    max_tokens: int
    streamable: Callable[[Any], tuple[list[nn.Module], list[tuple[str, nn.Module]]] | None] = lambda enc: None
    weight_bytes: Callable[[bool], int] = lambda streamed: 0
    has_weights: Callable[[Any], bool] = lambda cfg: True  # False: a preset on the built-in encoder
    dtype_on_gpu: torch.dtype = torch.float16  # what --text-encoder-precision auto means on a GPU


@dataclass(frozen=True, kw_only=True)
class ModelFamily:
    """Everything the launcher needs of one model family (torchtitan's ``ModelSpec``).

    ``name`` names the topology table (``configs/topology/<name>.yaml``; ``topology_table``
    overrides the path, None = the rule alone). ``build(config, device, dtype, seed)`` -> the DiT
    (meta device: shapes only); ``load(model, path)`` -> the checkpoint assigned strictly (a bad
    one raises before any collective); ``weight_files(model_dir, fp8, config)`` -> the files its loaders read
from a weight folder (with FP8 asked for: the fp8 DiT file where there is one), for the record;
``scheduler(steps=, shift=)`` -> a fresh sampler for one video
(``timesteps()`` `[steps]`, ``step(x, v, i)`` elementwise, so a rank steps its shard; multistep
samplers keep their history on it); ``blocks(model)`` -> ``[(state-dict prefix, block)]`` in
    execution order, the unit of layer streaming and FP8; ``check_model_dir(path, config)`` raises when a
    weight folder is missing (cheap, run on every rank); ``forward_work(config, image_tokens,
    text_tokens)`` -> the FLOPs of one forward (``models.cost.ForwardWork``, what `plan --predict`
    prices), None when the family does not declare them; ``set_token_chunk(model, tokens)`` bounds
    the tokens its token-wise parts see at once (the memory planner's chunking rung); ``cache(config)``
    -> the preset's step-cache settings (``models.step_cache.CacheSpec``)."""

    name: str
    presets: Mapping[str, Any]
    defaults: Mapping[str, PresetDefaults]
    build: Callable[..., nn.Module]
    load: Callable[[nn.Module, Path], nn.Module]
    blocks: Callable[[nn.Module], list[tuple[str, nn.Module]]]
    patchify: Callable[[torch.Tensor, tuple[int, int, int]], torch.Tensor]
    unpatchify: Callable[[torch.Tensor, tuple[int, int, int], tuple[int, int, int]], torch.Tensor]
    text: TextSpec
    vae: VaeSpec
    check_model_dir: Callable[[Path, Any], None] = lambda path, cfg: None
    weight_files: Callable[[Path, bool, Any], list[Path]] = lambda path, fp8, cfg: []  # what the loaders read (the record)
    scheduler: Callable[..., Any] = FlowMatchEuler  # (steps=, shift=) -> a fresh sampler per video
    forward_work: Callable[[Any, int, int], Any] | None = None
    # (model, max tokens | None): the DiT runs its token-wise parts in token chunks of that size
    # (models/chunking.py); None: the family does not chunk, and the planner never asks it to.
    set_token_chunk: Callable[[nn.Module, int | None], None] | None = None
    # (config) -> the preset's step-cache settings (models/step_cache.py; the DiT then keeps the
    # stage contract: enter, run_blocks, leave, tea_signal); None: `--cache` is refused.
    cache: Callable[[Any], CacheSpec] | None = None
    released: frozenset[str] = frozenset()  # presets of a published checkpoint: weights expected
    guidance: str = "embedded"  # "embedded": a distilled scale fed to the DiT; "cfg": classic CFG only
    default_negative_prompt: str | None = None
    size_multiple: int = 16  # height and width
    frame_step: int = 4  # frames = frame_step * n + 1 (the VAE's temporal compression)
    topology_table: str | None = field(default="", repr=False)
    preset_tables: Mapping[str, str] = field(default_factory=dict, repr=False)  # preset -> table name  # "" = configs/topology/<name>.yaml

    def __post_init__(self) -> None:
        if self.guidance not in GUIDANCE_KINDS:
            raise ValueError(f"family {self.name}: guidance {self.guidance!r}; valid: {', '.join(GUIDANCE_KINDS)}")
        missing = sorted(set(self.presets) - set(self.defaults))
        if missing:
            raise ValueError(f"family {self.name}: presets without defaults: {', '.join(missing)}")

    def config(self, preset: str):
        return self.presets[preset]

    def block_prefixes(self, model: nn.Module) -> tuple[str, ...]:
        """State-dict prefixes of the blocks ("double_blocks.0.", ...): what FP8 quantises."""
        return tuple(f"{name}." for name, _ in self.blocks(model))

    def topology_path(self, preset: str | None = None) -> str | None:
        """The topology YAML this family's jobs resolve with (None: no table, the rule alone):
        ``preset_tables[preset]`` where presets differ in heads (a table is for one head count),
        else ``topology_table``, else ``configs/topology/<name>.yaml``."""
        name = self.preset_tables.get(preset, self.name) if preset is not None else self.name
        if self.topology_table != "" and name == self.name:
            return self.topology_table
        from .configs import config_file

        return str(config_file("topology", f"{name}.yaml"))


_REGISTRY: dict[str, ModelFamily] = {}
_loaded_env: set[str] = set()


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family``; its preset names must be new (a preset names one family)."""
    for other in _REGISTRY.values():
        if other.name == family.name:
            continue
        clash = sorted(set(other.presets) & set(family.presets))
        if clash:
            raise ValueError(f"family {family.name}: preset(s) {', '.join(clash)} already belong to {other.name}")
    _REGISTRY[family.name] = family
    return family


def _load_env_families() -> None:
    for module in filter(None, (m.strip() for m in os.environ.get(FAMILIES_ENV, "").split(","))):
        if module not in _loaded_env:
            _loaded_env.add(module)
            importlib.import_module(module)


def families() -> list[ModelFamily]:
    _load_env_families()
    return list(_REGISTRY.values())


def list_presets() -> list[str]:
    return sorted(p for f in families() for p in f.presets)


def get_family(preset: str) -> ModelFamily:
    """The family that owns ``preset``; an unknown name raises ValueError listing the valid ones."""
    for family in families():
        if preset in family.presets:
            return family
    raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(list_presets())}")
