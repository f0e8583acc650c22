"""Tests for resadapt.data.video: lossless round trip, uniform sampling, metadata and error paths."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resadapt.data.video import (
    MEASURED_MAX_ABS_ERROR,
    VideoError,
    VideoInfo,
    probe_video,
    read_video,
    sample_frame_indices,
    write_video,
)

# 6x10 glyphs with 1-px strokes, like the benchmark's digits (1 = black).
_GLYPHS = {
    0: ["111111", "100001", "100001", "100001", "100001", "100001", "100001", "100001", "100001", "111111"],
    1: ["000100", "001100", "000100", "000100", "000100", "000100", "000100", "000100", "000100", "001110"],
    7: ["111111", "000001", "000010", "000100", "001000", "001000", "010000", "010000", "010000", "010000"],
}


def _synthetic_frames(num_frames: int = 8, height: int = 64, width: int = 64) -> np.ndarray:
    """White frames with saturated 2-px borders, 1-px lines, black digits and a moving coloured square."""
    frames = np.full((num_frames, height, width, 3), 255, dtype=np.uint8)
    for t in range(num_frames):
        f = frames[t]
        f[:2] = (255, 0, 0)
        f[-2:] = (0, 255, 0)
        f[:, :2] = (0, 0, 255)
        f[:, -2:] = (255, 255, 0)
        f[height // 2, 2:-2] = (0, 0, 0)
        f[2:-2, width // 3] = (255, 0, 255)
        for k, (digit, rows) in enumerate(_GLYPHS.items()):
            glyph = np.array([[c == "1" for c in r] for r in rows])
            y, x = 4 + t % 3, 6 + 8 * k + t
            f[y : y + 10, x : x + 6][glyph] = 0
            f[y : y + 10, x : x + 6][~glyph] = (255, 255, 255) if digit else (250, 250, 250)
        s = 4 + 3 * t
        f[40:48, s : s + 8] = (200, 30, 120)
        f[50, s] = (10, 200, 240)  # single isolated pixel
    return frames


@pytest.fixture()
def frames() -> np.ndarray:
    return _synthetic_frames()


def test_round_trip_is_within_measured_bound(tmp_path: Path, frames: np.ndarray) -> None:
    path = write_video(tmp_path / "clip.mp4", frames, fps=8.0)
    decoded, meta = read_video(path)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    err = np.abs(decoded.astype(np.int16) - frames.astype(np.int16))
    assert err.max() <= MEASURED_MAX_ABS_ERROR
    assert meta.frame_indices == list(range(8))
    with av.open(str(path)) as container:  # a real MP4 with H.264 inside
        assert "mp4" in container.format.name
        assert container.streams.video[0].codec_context.name == "h264"


def test_round_trip_noise_and_odd_size(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(3, 15, 21, 3), dtype=np.uint8)
    decoded, _ = read_video(write_video(tmp_path / "noise.mp4", noise, fps=30))
    np.testing.assert_array_equal(decoded, noise)


@pytest.mark.parametrize(
    ("n", "k", "expected"),
    [(10, 5, [1, 3, 5, 7, 9]), (8, 4, [1, 3, 5, 7]), (100, 1, [50]), (3, 5, [0, 1, 2]), (4, 4, [0, 1, 2, 3])],
)
def test_sample_frame_indices_examples(n: int, k: int, expected: list[int]) -> None:
    assert sample_frame_indices(n, k) == expected


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 5000), k=st.integers(1, 300))
def test_sample_frame_indices_properties(n: int, k: int) -> None:
    idx = sample_frame_indices(n, k)
    assert len(idx) == min(n, k)
    assert idx == sorted(set(idx))
    assert 0 <= idx[0] and idx[-1] < n
    if k < n:
        step = n / k
        for i, j in enumerate(idx):  # centre of segment i, up to flooring
            assert abs(j - (i + 0.5) * step) < 1
        gaps = np.diff(idx)
        assert gaps.size == 0 or gaps.max() - gaps.min() <= 1


@pytest.mark.parametrize(("n", "k"), [(0, 1), (5, 0), (-1, 3)])
def test_sample_frame_indices_rejects_bad_counts(n: int, k: int) -> None:
    with pytest.raises(ValueError):
        sample_frame_indices(n, k)


@pytest.mark.parametrize("k", [1, 3, 4, 8, 20])
def test_read_subsampled_returns_the_right_frames(tmp_path: Path, frames: np.ndarray, k: int) -> None:
    path = write_video(tmp_path / "clip.mp4", frames, fps=4.0)
    decoded, meta = read_video(path, num_frames=k)
    expected_idx = sample_frame_indices(8, k)
    assert meta.frame_indices == expected_idx
    np.testing.assert_array_equal(decoded, frames[expected_idx])
    assert meta.timestamps_s == pytest.approx([i / 4.0 for i in expected_idx])


@pytest.mark.parametrize("fps", [2.0, 24000 / 1001, 29.97, 0.5])
def test_fps_and_metadata_round_trip(tmp_path: Path, frames: np.ndarray, fps: float) -> None:
    path = write_video(tmp_path / "clip.mp4", frames, fps=fps)
    info = probe_video(path)
    assert info == VideoInfo(path, 8, pytest.approx(fps, rel=1e-9), pytest.approx(8 / fps), 64, 64)
    _, meta = read_video(path, num_frames=3)
    assert meta.fps == pytest.approx(fps, rel=1e-9)
    assert meta.total_num_frames == 8
    assert meta.duration_s == pytest.approx(8 / fps)
    assert meta.timestamps_s == pytest.approx([i / fps for i in meta.frame_indices])


def test_stream_without_frame_count_is_counted_while_decoding(tmp_path: Path, frames: np.ndarray) -> None:
    """Matroska headers carry no frame count (stream.frames == 0); reading must still work."""
    path = tmp_path / "clip.mkv"
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("libx264rgb", rate=Fraction(5))
        stream.width, stream.height, stream.pix_fmt = 64, 64, "rgb24"
        stream.options = {"qp": "0"}
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    decoded, meta = read_video(path, num_frames=3)
    assert meta.total_num_frames == 8 and meta.frame_indices == [1, 4, 6]
    np.testing.assert_array_equal(decoded, frames[[1, 4, 6]])
    assert probe_video(path).num_frames == 8
    assert read_video(path)[0].shape == frames.shape


def test_overwrite_refused_then_allowed(tmp_path: Path, frames: np.ndarray) -> None:
    path = write_video(tmp_path / "clip.mp4", frames, fps=8)
    before = path.read_bytes()
    with pytest.raises(VideoError, match="clip.mp4.*overwrite=True"):
        write_video(path, frames[::-1].copy(), fps=8)
    assert path.read_bytes() == before
    write_video(path, frames[::-1].copy(), fps=8, overwrite=True)
    np.testing.assert_array_equal(read_video(path)[0], frames[::-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temp files left


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((8, 8, 3), np.uint8), r"shape \(T, H, W, 3\)"),
        (np.zeros((2, 8, 8, 4), np.uint8), r"shape \(T, H, W, 3\)"),
        (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
        (np.zeros((0, 8, 8, 3), np.uint8), "non-empty"),
        ([[[[0, 0, 0]]]], "numpy array"),
    ],
)
def test_write_rejects_bad_frames(tmp_path: Path, bad: object, match: str) -> None:
    path = tmp_path / "bad.mp4"
    with pytest.raises(VideoError, match=match) as exc:
        write_video(path, bad, fps=8)  # type: ignore[arg-type]
    assert str(path) in str(exc.value)
    assert not path.exists()


@pytest.mark.parametrize("fps", [0, -1.0, float("nan"), float("inf"), True])
def test_write_rejects_bad_fps(tmp_path: Path, frames: np.ndarray, fps: float) -> None:
    with pytest.raises(VideoError, match="fps"):
        write_video(tmp_path / "clip.mp4", frames, fps=fps)


def _assert_read_error(path: Path, match: str) -> None:
    for call in (lambda: read_video(path), lambda: probe_video(path)):
        with pytest.raises(VideoError, match=match) as exc:
            call()
        assert str(path) in str(exc.value)


def test_missing_file(tmp_path: Path) -> None:
    _assert_read_error(tmp_path / "nope.mp4", "no such file")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.touch()
    _assert_read_error(path, "empty")


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _assert_read_error(path, "not a readable video")


def test_truncated_mp4(tmp_path: Path, frames: np.ndarray) -> None:
    path = write_video(tmp_path / "clip.mp4", frames, fps=8)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_read_error(path, "not a readable video")


def test_file_without_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    _assert_read_error(path, "no video stream")


@pytest.mark.parametrize("k", [0, -3, 2.0, True])
def test_read_rejects_bad_num_frames(tmp_path: Path, frames: np.ndarray, k: int) -> None:
    path = write_video(tmp_path / "clip.mp4", frames, fps=8)
    with pytest.raises(VideoError, match="num_frames") as exc:
        read_video(path, num_frames=k)
    assert str(path) in str(exc.value)
