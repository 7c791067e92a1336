"""Video, frame-grid and JSON outputs: content read back, atomic writes, no silent overwrite, names."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("av")
pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

import launcher.video as lv  # noqa: E402

F, H, W, SQ = 9, 64, 96, 16


def moving_square() -> torch.Tensor:
    """`[3, F, H, W]` in [-1, 1]: a horizontal grey ramp with a white square moving 8 px a frame."""
    video = torch.linspace(-0.8, 0.2, W).expand(3, F, H, W).clone()
    for f in range(F):
        video[:, f, 24 : 24 + SQ, 8 * f : 8 * f + SQ] = 1.0
    return video


def expected_uint8(video: torch.Tensor) -> np.ndarray:
    """`[F, H, W, 3]` uint8 as the HunyuanVideo release computes it: x/2 + 0.5 clamped in the
    video's dtype, then `(x * 255).numpy().astype(np.uint8)` (truncation)."""
    unit = (video / 2 + 0.5).clamp(0, 1).float()
    return (unit.permute(1, 2, 3, 0).numpy() * 255).astype(np.uint8)


def test_frames_truncate_like_the_release_not_round():
    # Levels k + 0.7: truncation gives k, rounding would give k + 1.
    levels = torch.tensor([0.7, 10.7, 127.7, 254.7, 255.0, 300.0, -5.0])
    video = (levels / 255 - 0.5).mul(2).view(1, 1, 1, -1).expand(3, 1, 2, -1).contiguous()
    frame = lv.frame_uint8(video, 0)
    assert frame[0, :, 0].tolist() == [0, 10, 127, 254, 255, 255, 0]
    assert np.array_equal(frame, expected_uint8(video)[0])
    # fp16 (the VAE's dtype on GPU) is mapped to [0, 1] in fp16 first, as the release does.
    half = video.half()
    assert np.array_equal(lv.frame_uint8(half, 0), expected_uint8(half)[0])


def only_file(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_video_probe_and_pixels(tmp_path):
    video = moving_square()
    path = lv.write_video(video, tmp_path / "out.mp4", fps=24)
    assert only_file(tmp_path) == ["out.mp4"]
    info = lv.probe_video(path)
    assert info == {"frames": F, "height": H, "width": W, "fps": 24.0, "codec": "h264", "pix_fmt": "yuv420p"}
    got = lv.read_video_frames(path).astype(np.int16)
    want = expected_uint8(video).astype(np.int16)
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 3  # lossy, but close at crf 18
    for f in (0, 4, 8):  # the square is where it should be, and gone from where it was
        assert got[f, 28:36, 8 * f + 4 : 8 * f + 12].min() > 230
        if f:
            assert got[f, 28:36, 8 * f - 8 : 8 * f - 4].max() < 150


def test_fractional_fps(tmp_path):
    path = lv.write_video(moving_square()[:, :2], tmp_path / "ntsc.mp4", fps=30000 / 1001)
    assert lv.probe_video(path)["fps"] == pytest.approx(29.97, abs=1e-3)


def test_no_overwrite_unless_asked(tmp_path):
    path = tmp_path / "out.mp4"
    lv.write_video(moving_square(), path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        lv.write_video(-moving_square(), path)
    assert path.read_bytes() == before
    lv.write_video(-moving_square(), path, overwrite=True)
    assert path.read_bytes() != before and only_file(tmp_path) == ["out.mp4"]


def test_failure_mid_encode_leaves_nothing(tmp_path, monkeypatch):
    real = lv.frame_uint8

    def fail_on_frame_3(video, i):
        if i == 3:
            raise RuntimeError("disk on fire")
        return real(video, i)

    monkeypatch.setattr(lv, "frame_uint8", fail_on_frame_3)
    with pytest.raises(RuntimeError, match="disk on fire"):
        lv.write_video(moving_square(), tmp_path / "out.mp4")
    assert only_file(tmp_path) == []  # no final file, no temporary left behind
    (tmp_path / "keep.mp4").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        lv.write_video(moving_square(), tmp_path / "keep.mp4", overwrite=True)
    assert (tmp_path / "keep.mp4").read_bytes() == b"old" and only_file(tmp_path) == ["keep.mp4"]


def test_target_created_during_the_write_is_not_replaced(tmp_path):
    target = tmp_path / "x.json"

    def another_writer_wins(tmp):
        tmp.write_text("mine")
        target.write_text("theirs")

    with pytest.raises(FileExistsError):
        lv.write_atomic(target, another_writer_wins)
    assert target.read_text() == "theirs" and only_file(tmp_path) == ["x.json"]


@pytest.mark.parametrize(
    "video, match",
    [
        (torch.zeros(F, 3, H, W), r"\[3, F, H, W\]"),
        (torch.zeros(3, H, W), r"\[3, F, H, W\]"),
        (torch.zeros(3, F, H, W, dtype=torch.uint8), "float"),
        (torch.full((3, F, H, W), float("nan")), "NaN"),
        (torch.zeros(3, F, 63, W), "even height and width, got 63x96"),
    ],
)
def test_bad_videos_are_refused_before_writing(tmp_path, video, match):
    with pytest.raises(ValueError, match=match):
        lv.write_video(video, tmp_path / "bad.mp4")
    assert only_file(tmp_path) == []


def test_frame_grid(tmp_path):
    video = moving_square()
    path = lv.write_frame_grid(video, tmp_path / "grid.png", max_frames=4, columns=3)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * H, 3 * W, 3)
    want = expected_uint8(video)
    # 4 evenly spaced of 9 frames: round(linspace(0, 8, 4)) = 0, 3, 5, 8; PNG is lossless.
    for k, f in enumerate([0, 3, 5, 8]):
        r, c = divmod(k, 3)
        assert np.array_equal(grid[r * H : (r + 1) * H, c * W : (c + 1) * W], want[f])
    assert not grid[H:, 2 * W :].any()  # the unused cell stays black
    with pytest.raises(FileExistsError):
        lv.write_frame_grid(video, path)


def test_frame_grid_with_fewer_frames_than_asked(tmp_path):
    path = lv.write_frame_grid(moving_square()[:, :1], tmp_path / "one.png")
    assert Image.open(path).size == (W, H)


def test_json_atomic(tmp_path):
    record = {"seed": 42, "dtype": torch.bfloat16, "dir": tmp_path, "sizes": [1, 2]}
    path = lv.write_json_atomic(record, tmp_path / "run.json")
    want = {"seed": 42, "dtype": "torch.bfloat16", "dir": str(tmp_path), "sizes": [1, 2]}
    assert json.loads(path.read_text()) == want
    with pytest.raises(FileExistsError):
        lv.write_json_atomic({}, path)
    with pytest.raises(TypeError, match="JSON record"):
        lv.write_json_atomic({"x": object()}, tmp_path / "bad.json")
    assert only_file(tmp_path) == ["run.json"]
    lv.write_json_atomic({"a": 1}, tmp_path / "sub" / "run.json")  # creates the folder
    assert json.loads((tmp_path / "sub" / "run.json").read_text()) == {"a": 1}


def test_output_stem_and_slug_rules():
    assert lv.output_stem("A cat walks on the grass", 42) == "a-cat-walks-on-the-grass_seed42"
    assert lv.prompt_slug("  Café, crème brûlée!  (4K) ") == "cafe-creme-brulee-4k"
    long = "a very long prompt that goes on and on about a cat walking slowly across the grass"
    slug = lv.prompt_slug(long)
    assert len(slug) <= 48 and long.replace(" ", "-").startswith(slug) and not slug.endswith("-")
    assert lv.prompt_slug(long, max_chars=12) == "a-very-long"  # whole words only
    assert lv.prompt_slug("x" * 60) == "x" * 48
    assert lv.prompt_slug("一只猫在草地上走") == lv.prompt_slug("一只猫在草地上走")
    assert lv.prompt_slug("一只猫在草地上走").startswith("prompt-")
    assert lv.prompt_slug("一只猫在草地上走") != lv.prompt_slug("一只狗在雪地里跑")
    assert lv.output_stem("", 0) == lv.prompt_slug("") + "_seed0"


def _sequential_mp4(video: torch.Tensor, path) -> None:
    """The writer as it was before frames were converted ahead on a thread and x264 used frame
    threads: RGB frames handed one by one to PyAV's encoder with its default threading."""
    import av

    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = video.shape[3], video.shape[2], "yuv420p"
        stream.options = {"crf": "18"}
        for i in range(video.shape[1]):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(lv.frame_uint8(video, i), format="rgb24")))
        container.mux(stream.encode())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fast_writer_decodes_to_the_same_frames_as_the_sequential_one(tmp_path, dtype):
    """Same codec settings, same input pixels: the decoded frames are as close to the source as
    before. (x264's bitstream is not bit-stable from run to run even single-threaded, so the two
    files are compared by their decoded frames, not their bytes.)"""
    video = moving_square().to(dtype)
    lv.write_video(video, tmp_path / "fast.mp4")
    _sequential_mp4(video, tmp_path / "seq.mp4")
    fast, seq = (lv.read_video_frames(tmp_path / f"{n}.mp4").astype(np.int16) for n in ("fast", "seq"))
    source = expected_uint8(video).astype(np.int16)
    assert fast.shape == seq.shape == source.shape
    err_fast, err_seq = np.abs(fast - source).mean(), np.abs(seq - source).mean()
    assert err_fast <= err_seq + 0.25, (err_fast, err_seq)
    assert np.abs(fast - seq).mean() <= 1


def test_prefetched_hands_on_errors_and_stops_its_thread():
    import threading

    def failing():
        yield 1
        raise RuntimeError("frame 2 is bad")

    got = []
    with pytest.raises(RuntimeError, match="frame 2 is bad"):
        for item in lv.prefetched(failing()):
            got.append(item)
    assert got == [1]
    endless = lv.prefetched(iter(range(10**9)), depth=2)
    assert next(endless) == 0
    endless.close()  # the consumer stops early: the producer thread ends too
    assert not any(t.name == "frames" and t.is_alive() for t in threading.enumerate())
