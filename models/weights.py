"""Reading checkpoints (torch pickles memory-mapped, safetensors) and loading them strictly.

Memory-mapping matters under torchrun: N ranks on one node map the same file and share its pages
in the OS cache instead of each holding a private copy in host RAM.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from torch import nn

from .family import ModelInputError

StateDict = dict[str, torch.Tensor]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
# Where the release and diffusers put the DiT inside a model directory, in search order; the
# release's fp8 file (`..._fp8.pt`, its scales in `..._fp8_map.pt`) comes first when fp8 is wanted.
_RELEASE_DIRS = ("transformers/", "hunyuan-video-t2v-720p/transformers/", "")
_RELEASE_NAMES = ("mp_rank_00_model_states.pt", "mp_rank_00_model_states_fp8.pt")


def _dir_candidates(prefer_fp8: bool = False) -> list[str]:
    names = _RELEASE_NAMES[::-1] if prefer_fp8 else _RELEASE_NAMES
    # Then folders holding safetensors: the release's layout with a safetensors file, diffusers'.
    return [d + n for n in names for d in _RELEASE_DIRS] + [d.rstrip("/") for d in _RELEASE_DIRS if d] + ["transformer"]


_WRAPPER_KEYS = ("module", "ema", "state_dict", "model")


class CheckpointError(ModelInputError):
    """A checkpoint that cannot be read or does not match the model."""


def resolve_checkpoint(path: str | Path, *, prefer_fp8: bool = False) -> list[Path]:
    """The weight files behind `path`: a file, a diffusers folder (sharded safetensors with an
    index), or a model directory laid out like the release (`transformers/mp_rank_00_...pt`,
    the `_fp8.pt` variant first if `prefer_fp8`, else as a fallback)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*" + SAFETENSORS_SUFFIX))
    if files:
        return files
    for rel in _dir_candidates(prefer_fp8):
        if (path / rel).exists():
            return resolve_checkpoint(path / rel, prefer_fp8=prefer_fp8)
    raise CheckpointError(
        f"no DiT weights found in {path}: expected *.safetensors, a safetensors index, or one of "
        + ", ".join(_dir_candidates())
    )


def _load_pickle(path: Path, mmap: bool):
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as err:  # corrupt or not a torch file: say which file
        if mmap and "mmap" in str(err):
            raise  # a pre-1.6 (non-zip) pickle: the caller retries without mmap
        raise CheckpointError(f"{path}: cannot read torch checkpoint: {err}") from err


def _read_pickle(path: Path) -> StateDict:
    try:
        obj = _load_pickle(path, mmap=True)
    except CheckpointError:
        raise
    except Exception:
        obj = _load_pickle(path, mmap=False)  # non-zip pickles cannot be mapped; read them whole
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (or one under 'module'/'ema'/'state_dict')")
    return obj


def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")  # safetensors memory-maps the file itself
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: cannot read safetensors file: {err}") from err


def read_state_dict(path: str | Path) -> StateDict:
    """All tensors of the checkpoint at `path` (see `resolve_checkpoint`), on the CPU."""
    return read_files(resolve_checkpoint(path))


def read_files(files: list[Path]) -> StateDict:
    """All tensors of these weight files (safetensors or torch pickles), on the CPU."""
    out: StateDict = {}
    for file in files:
        suffix = file.suffix.lower()
        if suffix == SAFETENSORS_SUFFIX:
            out.update(_read_safetensors(file))
        elif suffix in PICKLE_SUFFIXES:
            out.update(_read_pickle(file))
        else:
            raise CheckpointError(
                f"{file}: unknown checkpoint file type {suffix!r}; supported: "
                + ", ".join((*PICKLE_SUFFIXES, SAFETENSORS_SUFFIX))
            )
    return out


def check_state_dict(
    model: nn.Module,
    sd: StateDict,
    source: str | Path,
    *,
    target: str = "the model",
    error: type[CheckpointError] = CheckpointError,
    show: int = 3,
) -> None:
    """Raise `error` naming the file and the first `show` missing, unexpected and mis-shaped keys,
    e.g. "w.pt: does not match the model: 1 missing (a.bias); 2 unexpected (x, y)"."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [
        f"{k} {tuple(sd[k].shape)} != {expected[k]}"
        for k in expected
        if k in sd and (not isinstance(sd[k], torch.Tensor) or tuple(sd[k].shape) != expected[k])
    ]
    problems = [
        f"{len(keys)} {what} ({', '.join(keys[:show])}{', ...' if len(keys) > show else ''})"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if keys
    ]
    if not problems:
        problems = _float8_mismatches(model, sd, show)
    if problems:
        raise error(f"{source}: does not match {target}: " + "; ".join(problems))


def _float8_mismatches(model: nn.Module, sd: StateDict, show: int) -> list[str]:
    """A float8 tensor must land on a float8 tensor and vice versa: a plain cast either way would
    load silently wrong values (fp8 needs its scale; `models.fp8_checkpoint.prepare_state_dict` handles both)."""
    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    bad = [
        f"{k} {v.dtype} for {p.dtype}"
        for k, p in model.state_dict().items()
        if (v := sd[k]).dtype != p.dtype and (v.dtype in fp8 or p.dtype in fp8)
    ]
    if not bad:
        return []
    return [f"{len(bad)} float8 tensors without their scales or unquantised ({', '.join(bad[:show])}{', ...' if len(bad) > show else ''})"]


@torch.no_grad()
def assign_state_dict(model: nn.Module, sd: StateDict) -> None:
    """Put checked tensors into the model: a model on the meta device takes them as they are
    (memory-mapped, cast only if its dtype differs); a materialised one copies them in."""
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    if any(p.is_meta for p in params.values()):
        cast = {k: sd[k].to(params[k].dtype) for k in params}
        model.load_state_dict(cast, strict=True, assign=True)
    else:
        for k, p in params.items():
            p.copy_(sd[k])


@torch.no_grad()
def init_random_(model: nn.Module, seed: int, prefix: str = "") -> nn.Module:
    """Seeded random weights, independent of parameter creation order and of other RNG use.

    Each parameter draws from its own generator seeded by (seed, prefix + name), so the same seed
    gives the same weights on every rank of the same device type, and a submodule initialised on
    its own with its path as ``prefix`` gets the weights it would get inside the whole model.
    Matrices: U(+-1/sqrt(fan_in)) as nn.Linear; norm weights 1 and norm biases 0; other vectors
    U(+-0.02).
    """
    for name, p in model.named_parameters(prefix=prefix.removesuffix(".")):
        gen = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if p.ndim == 1 and "norm" in name:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
            continue
        bound = (p[0].numel() ** -0.5) if p.ndim > 1 else 0.02
        tmp = torch.empty(p.shape, device=p.device, dtype=torch.float32)
        tmp.uniform_(-bound, bound, generator=gen)
        p.copy_(tmp)
    return model
