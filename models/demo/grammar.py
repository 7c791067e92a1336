"""The demo model's world: captions from a fixed grammar, the videos they describe, and the
read-back that says what a video shows.

A caption is "a {colour} {shape} {motion}" ("a red circle moves left", "a blue square grows"):
one flat-coloured shape on a plain background, moving 40-56 px across the frame or growing /
shrinking in place. `render` draws such videos (batched, on any device, differentiable-free
torch); `read_back` takes decoded frames and returns the dominant non-background colour and the
motion, so a generated video can be checked against its prompt. `HELD_OUT` combinations are never
drawn for training: a model that renders them learned the words, not the captions.

Layouts: videos `[B, 3, F, H, W]` in [-1, 1] (the VAE's input); frames for `read_back` uint8
`[F, H, W, 3]` (what `launcher.video.read_video_frames` returns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# RGB in 0..255: far apart from each other and from every background.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "cyan": (40, 210, 220),
}
BACKGROUNDS = {"black": (12, 12, 12), "gray": (110, 110, 110), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("moves left", "moves right", "moves up", "moves down", "grows", "shrinks")
# (dx, dy) unit direction of each translation, image coordinates (y down).
_DIRECTIONS = {"moves left": (-1, 0), "moves right": (1, 0), "moves up": (0, -1), "moves down": (0, 1)}

# Never drawn for training; every colour, shape and motion still appears in other combinations.
HELD_OUT = (
    ("red", "triangle", "moves up"),
    ("green", "square", "shrinks"),
    ("blue", "circle", "moves right"),
    ("yellow", "triangle", "grows"),
    ("purple", "circle", "moves down"),
    ("cyan", "square", "moves left"),
    ("red", "square", "grows"),
    ("green", "circle", "moves left"),
    ("blue", "triangle", "shrinks"),
    ("yellow", "square", "moves down"),
)

SIZE, FRAMES = 128, 17  # the demo's video: 128x128 pixels, 17 frames (latents 5x16x16)


@dataclass(frozen=True)
class Caption:
    colour: str
    shape: str
    motion: str

    @property
    def text(self) -> str:
        return f"a {self.colour} {self.shape} {self.motion}"


def all_captions() -> list[Caption]:
    return [Caption(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS]


def training_captions() -> list[Caption]:
    held = set(HELD_OUT)
    return [c for c in all_captions() if (c.colour, c.shape, c.motion) not in held]


def parse(prompt: str) -> Caption:
    """The caption a prompt of the grammar states; ValueError for any other text."""
    words = prompt.strip().lower().split()
    if len(words) < 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
        raise ValueError(f"not a demo caption ('a <colour> <shape> <motion>'): {prompt!r}")
    motion = " ".join(words[3:])
    if motion not in MOTIONS:
        raise ValueError(f"not a demo motion in {prompt!r}; valid: {', '.join(MOTIONS)}")
    return Caption(words[1], words[2], motion)


def check_prompts(count: int = 24) -> list[Caption]:
    """The prompts of the automatic check: every held-out combination, then seen ones spread
    over colours, shapes and motions (a fixed list, so runs compare)."""
    seen = training_captions()
    picks = [Caption(*h) for h in HELD_OUT]
    # A stride coprime to len(seen) walks through every colour/shape/motion before repeating.
    stride = next(s for s in range(len(seen) // 7, len(seen)) if math.gcd(s, len(seen)) == 1)
    i = 0
    while len(picks) < count:
        picks.append(seen[i % len(seen)])
        i += stride
    return picks


# --- rendering --------------------------------------------------------------------------------


def _sample_geometry(motion: str, gen: torch.Generator, size: int) -> tuple[float, float, float, float, float, float]:
    """(x0, y0, x1, y1, r0, r1): centre and half-size at the first and last frame, in pixels."""
    u = torch.rand(4, generator=gen).tolist()
    if motion in _DIRECTIONS:
        r = 10 + 8 * u[0]
        dist = 40 + 16 * u[1]
        dx, dy = _DIRECTIONS[motion]
        lo, hi = r + 2, size - r - 2  # the whole path stays inside the frame
        # Along the motion the start leaves room for the distance; across it anywhere.
        along = lo + dist + (hi - lo - dist) * u[2] if (dx or dy) < 0 else lo + (hi - lo - dist) * u[2]
        across = lo + (hi - lo) * u[3]
        x0, y0 = (along, across) if dx else (across, along)
        return x0, y0, x0 + dx * dist, y0 + dy * dist, r, r
    small, big = 7 + 3 * u[0], 26 + 6 * u[1]
    cx, cy = (big + 2 + (size - 2 * big - 4) * v for v in u[2:4])
    return (cx, cy, cx, cy, small, big) if motion == "grows" else (cx, cy, cx, cy, big, small)


def _coverage(shape: str, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of a shape centred at the origin (x, y relative), half-size r."""
    if shape == "circle":
        inside = r - torch.sqrt(x * x + y * y)
    elif shape == "square":
        inside = r - torch.maximum(x.abs(), y.abs())
    else:  # an upright triangle: apex r above the centre, base r below, base width 2r
        base = r - y
        sides = ((y + r) / 2 - x.abs()) * (2 / math.sqrt(5))
        inside = torch.minimum(base, sides)
    return (inside + 0.5).clamp(0, 1)


def render(captions: list[Caption], seed: int, *, size: int = SIZE, frames: int = FRAMES,
           device: str | torch.device = "cpu", backgrounds: list[str] | None = None) -> torch.Tensor:
    """Videos `[B, 3, frames, size, size]` in [-1, 1] for the captions; positions, sizes, speeds
    and backgrounds drawn from `seed` (a CPU generator: the same videos on every device)."""
    gen = torch.Generator().manual_seed(seed)
    names = list(BACKGROUNDS)
    t = torch.linspace(0, 1, frames, device=device).view(frames, 1, 1)
    pix = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    ys, xs = pix.view(1, size, 1), pix.view(1, 1, size)
    out = torch.empty(len(captions), 3, frames, size, size, device=device)
    for b, cap in enumerate(captions):
        x0, y0, x1, y1, r0, r1 = _sample_geometry(cap.motion, gen, size)
        bg_name = backgrounds[b] if backgrounds else names[int(torch.randint(len(names), (1,), generator=gen))]
        cx, cy, r = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, r0 + (r1 - r0) * t
        alpha = _coverage(cap.shape, xs - cx, ys - cy, r)  # [F, H, W]
        bg = torch.tensor(BACKGROUNDS[bg_name], device=device, dtype=torch.float32).view(3, 1, 1, 1)
        fg = torch.tensor(COLOURS[cap.colour], device=device, dtype=torch.float32).view(3, 1, 1, 1)
        out[b] = (bg + (fg - bg) * alpha) / 127.5 - 1
    return out


# --- reading back -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """What a video shows: colour (nearest palette colour of the non-background pixels, or None),
    motion (one of MOTIONS, or None), and the numbers behind them."""

    colour: str | None
    motion: str | None
    dx: float  # centroid shift, first to last frames, pixels (x right)
    dy: float  # (y down)
    growth: float  # area, last frames / first frames
    fg_fraction: float


FG_DISTANCE = 60.0  # RGB distance from the background above which a pixel is the shape's
MIN_SHIFT = 16.0  # pixels of centroid travel that count as "moves"
MIN_GROWTH = 1.8  # area ratio that counts as "grows" (its inverse: "shrinks")


def _foreground(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: the background colour (median of the border pixels) and the shape's mask."""
    f = frames.astype(np.float32)
    border = np.concatenate([f[:, 0], f[:, -1], f[:, :, 0], f[:, :, -1]], axis=1)  # [F, 4W, 3]
    bg = np.median(border, axis=1)  # [F, 3]
    mask = np.linalg.norm(f - bg[:, None, None], axis=-1) > FG_DISTANCE
    return bg, mask


def read_back(frames: np.ndarray) -> Reading:
    """Read a video `[F, H, W, 3]` uint8: its shape's colour and motion."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 2:
        raise ValueError(f"expected uint8 frames [F>=2, H, W, 3], got {frames.shape}")
    _, mask = _foreground(frames)
    area = mask.reshape(len(mask), -1).sum(1).astype(np.float64)
    fg_fraction = float(area.mean() / mask[0].size)
    if area.min() < 4:
        return Reading(None, None, 0.0, 0.0, 0.0, fg_fraction)
    pixels = frames[mask].astype(np.float32)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    colour = list(COLOURS)[int(np.linalg.norm(palette - pixels.mean(0), axis=1).argmin())]
    ys, xs = np.indices(mask.shape[1:])
    cx = (mask * xs).reshape(len(mask), -1).sum(1) / area
    cy = (mask * ys).reshape(len(mask), -1).sum(1) / area
    k = max(1, len(mask) // 5)  # average the first and last fifths: robust to one odd frame
    dx, dy = float(cx[-k:].mean() - cx[:k].mean()), float(cy[-k:].mean() - cy[:k].mean())
    growth = float(area[-k:].mean() / area[:k].mean())
    return Reading(colour, _motion(dx, dy, growth), dx, dy, growth, fg_fraction)


def _motion(dx: float, dy: float, growth: float) -> str | None:
    if growth >= MIN_GROWTH:
        return "grows"
    if growth <= 1 / MIN_GROWTH:
        return "shrinks"
    if max(abs(dx), abs(dy)) < MIN_SHIFT:
        return None
    if abs(dx) >= abs(dy):
        return "moves right" if dx > 0 else "moves left"
    return "moves down" if dy > 0 else "moves up"
