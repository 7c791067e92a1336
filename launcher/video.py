"""Writing a run's outputs: the mp4 (PyAV, H.264 yuv420p), a PNG grid of frames, the JSON record.

Every file is written to a hidden temporary name in its destination folder and moved into place
only once it is complete, so a crash or a full disk never leaves a truncated mp4 under the final
name, and a reader never sees half a file. Existing files are kept unless `overwrite=True`.
Videos are float tensors `[3, F, H, W]` in [-1, 1] (the VAE's output for one sample).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import math
import os
import queue
import re
import secrets
import threading
import unicodedata
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

# --- names --------------------------------------------------------------------------------------


def prompt_slug(prompt: str, max_chars: int = 48) -> str:
    """Lowercase ASCII words of `prompt` joined by '-', whole words only, at most `max_chars`.
    A prompt with no ASCII word (e.g. Chinese) gets `prompt-<8 hex of its sha256>` instead, so
    that different such prompts still get different names."""
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode().lower()
    words = re.findall(r"[a-z0-9]+", text)
    if not words:
        return "prompt-" + hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8]
    slug = words[0][:max_chars]
    for word in words[1:]:
        if len(slug) + 1 + len(word) > max_chars:
            break
        slug += "-" + word
    return slug


def output_stem(prompt: str, seed: int, *, max_chars: int = 48) -> str:
    """File name stem for a run, e.g. `a-cat-walks-on-the-grass_seed42`."""
    return f"{prompt_slug(prompt, max_chars)}_seed{seed}"


# --- atomic writes ------------------------------------------------------------------------------


def _exists_error(path: Path) -> FileExistsError:
    return FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        # A hard link fails if `path` exists, atomically: no window in which another writer's file
        # could be replaced between a check and the rename.
        os.link(tmp, path)
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError:  # a filesystem without hard links: check, then rename
        if path.exists():
            raise _exists_error(path) from None
        os.replace(tmp, path)
    else:
        tmp.unlink()


def write_atomic(path: str | Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Call `write(tmp)` to fill a temporary file beside `path`, then move it to `path`. The
    temporary file is removed whatever happens; `path` exists only if `write` succeeded."""
    path = Path(path)
    if path.exists() and not overwrite:  # fail before spending time on the content
        raise _exists_error(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        _publish(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def whole_or_none(paths: Iterable[Path]):
    """The files of one result (a prompt's video, grid, latents and record) are kept all or none:
    if writing any of them fails (a full disk, Ctrl-C), those already written are removed."""
    try:
        yield
    except BaseException:
        for path in paths:
            Path(path).unlink(missing_ok=True)
        raise


def _json_default(obj):
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to the JSON record: {obj!r}")


def write_json_atomic(obj, path: str | Path, overwrite: bool = False) -> Path:
    """`obj` as indented JSON (paths, dtypes, devices, enums and dataclasses allowed)."""
    text = json.dumps(obj, indent=2, default=_json_default) + "\n"  # serialise before touching disk
    return write_atomic(path, lambda tmp: tmp.write_text(text), overwrite=overwrite)


# --- frames -------------------------------------------------------------------------------------


def check_video(video: torch.Tensor) -> None:
    """Raise ValueError unless `video` is a finite float tensor `[3, F, H, W]` with F, H, W >= 1."""
    if not isinstance(video, torch.Tensor) or video.ndim != 4 or video.shape[0] != 3 or min(video.shape) < 1:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"expected a video tensor [3, F, H, W] (RGB, frames, height, width), got {shape}")
    if not video.is_floating_point():
        raise ValueError(f"expected a float video in [-1, 1], got dtype {video.dtype}")
    if not torch.isfinite(video).all():
        raise ValueError("video has NaN or infinite values; refusing to write it (the run diverged)")


def frame_uint8(video: torch.Tensor, index: int) -> np.ndarray:
    """Frame `index` of `[3, F, H, W]` in [-1, 1] as `[H, W, 3]` uint8 RGB, converted as the
    HunyuanVideo release (and diffusers' `export_to_video`) do: mapped to [0, 1] and clamped in
    the video's own dtype, then `x * 255` in fp32 truncated (not rounded) to uint8. Converted on
    the video's device and one frame at a time, so only uint8 frames cross to the host."""
    unit = (video[:, index] / 2 + 0.5).clamp(0, 1).float()
    frame = (unit * 255).to(torch.uint8)  # float -> uint8 truncates toward zero
    return frame.permute(1, 2, 0).cpu().numpy()


# --- mp4 ----------------------------------------------------------------------------------------


def _yuv_frames(video: torch.Tensor):
    """The frames as the encoder takes them: uint8 RGB (``frame_uint8``) reformatted to yuv420p
    with the reformatter's defaults, the conversion PyAV's encoder would otherwise run itself."""
    import av

    _, frames, height, width = video.shape
    for i in range(frames):
        rgb = av.VideoFrame.from_ndarray(frame_uint8(video, i), format="rgb24")
        yield rgb.reformat(width=width, height=height, format="yuv420p")


def prefetched(items: Iterator, depth: int = 8) -> Iterator:
    """``items`` produced on a background thread, at most ``depth`` ahead of the consumer: the
    frame conversion (sws_scale, which drops the GIL) runs while the encoder works. An error in
    the producer is raised here; a consumer that stops early stops the producer."""
    box: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def put(entry) -> bool:  # gives up once the consumer has stopped (it no longer empties the queue)
        while not stop.is_set():
            try:
                box.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            put((end, err))

    worker = threading.Thread(target=produce, name="frames", daemon=True)
    worker.start()
    try:
        while True:
            item, err = box.get()
            if err is not None:
                raise err
            if item is end:
                return
            yield item
    finally:
        stop.set()
        worker.join()


def _encode_mp4(video: torch.Tensor, tmp: Path, fps: Fraction, crf: int) -> None:
    import av

    _, frames, height, width = video.shape
    # faststart puts the index first, so browsers play the file before it is fully downloaded.
    with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf)}
        # PyAV's default asks x264 for slice threads; frame threads (x264's own default, one per
        # ~2/3 core) keep every core busy on a long clip. Same settings, same quality.
        stream.codec_context.thread_type, stream.codec_context.thread_count = "AUTO", 0
        for frame in prefetched(_yuv_frames(video)):
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush the encoder's delayed frames


def write_video(
    video: torch.Tensor, path: str | Path, *, fps: float = 24, overwrite: bool = False, crf: int = 18
) -> Path:
    """Write `[3, F, H, W]` in [-1, 1] as an H.264 mp4 (yuv420p, constant rate factor `crf`)."""
    check_video(video)
    height, width = video.shape[2:]
    if height % 2 or width % 2:
        # yuv420p stores chroma at half resolution in both directions, so libx264 rejects odd sizes.
        raise ValueError(f"H.264 yuv420p needs an even height and width, got {height}x{width}")
    if not fps > 0 or not 0 <= crf <= 51:
        raise ValueError(f"need fps > 0 and 0 <= crf <= 51, got fps={fps}, crf={crf}")
    rate = Fraction(fps).limit_denominator(1001)
    return write_atomic(path, lambda tmp: _encode_mp4(video, tmp, rate, crf), overwrite=overwrite)


def write_frame_grid(
    video: torch.Tensor, path: str | Path, *, max_frames: int = 8, columns: int = 4, overwrite: bool = False
) -> Path:
    """A PNG of up to `max_frames` evenly spaced frames (first and last included), `columns` wide."""
    from PIL import Image

    check_video(video)
    _, frames, height, width = video.shape
    n = max(1, min(max_frames, frames))
    # n <= frames points over [0, frames-1] are >= 1 apart, so the rounded indices are distinct.
    indices = torch.linspace(0, frames - 1, n).round().long().tolist()
    cols = min(columns, n)
    grid = Image.new("RGB", (cols * width, math.ceil(n / cols) * height))
    for k, i in enumerate(indices):
        grid.paste(Image.fromarray(frame_uint8(video, i)), ((k % cols) * width, (k // cols) * height))
    # zlib level 1: the same pixels (PNG is lossless) in a fraction of the default level's time.
    return write_atomic(path, lambda tmp: grid.save(tmp, format="PNG", compress_level=1), overwrite=overwrite)


# --- reading back -------------------------------------------------------------------------------


def probe_video(path: str | Path) -> dict:
    """Decode every frame of `path`'s first video stream: {frames, height, width, fps, codec, pix_fmt}."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        ctx = stream.codec_context
        return {
            "frames": frames,
            "height": ctx.height,
            "width": ctx.width,
            "fps": float(stream.average_rate),
            "codec": ctx.name,
            "pix_fmt": ctx.pix_fmt,
        }


def read_video_frames(path: str | Path) -> np.ndarray:
    """All frames of `path` as uint8 RGB `[F, H, W, 3]`."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
