"""Streamed video decoding and encoding with PyAV (the optional ``[video]`` extra).

Frames are decoded one at a time (memory bounded whatever the video's length) as RGB ``uint8`` arrays. The overlay
video goes into the input's container where an encoder for it is available (``.mp4``/``.mov``/``.m4v``/``.mkv``:
H.264, ``.webm``: VP9, ``.avi``: MPEG-4 part 2), otherwise into an MP4.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = [
    "VIDEO_INSTALL_HINT", "VIDEO_SUFFIXES", "VideoError", "VideoInfo", "DecodedFrame", "require_av", "is_video_path",
    "probe_video", "iter_video_frames", "output_format", "VideoWriter", "check_sampling",
]

VIDEO_INSTALL_HINT = 'pip install "cass_plugins[video]"'

#: File suffixes ``cass-segment`` treats as videos.
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".gif")

# suffix → (container format, codecs to try in order); anything else is written as MP4
_CONTAINERS: dict[str, tuple[str, tuple[str, ...]]] = {
    ".mp4": ("mp4", ("libx264", "h264", "mpeg4")),
    ".m4v": ("mp4", ("libx264", "h264", "mpeg4")),
    ".mov": ("mov", ("libx264", "h264", "mpeg4")),
    ".mkv": ("matroska", ("libx264", "h264", "mpeg4")),
    ".webm": ("webm", ("libvpx-vp9", "libvpx")),
    ".avi": ("avi", ("mpeg4",)),
}


class VideoError(ValueError):
    """A video that cannot be read (missing, not a video, corrupt) or written."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream."""

    path: Path
    width: int
    height: int
    fps: Fraction | None
    frames: int | None  # as the container states it (may be missing or approximate)
    codec: str
    container: str


@dataclass
class DecodedFrame:
    """One decoded frame: its index in the source, its time in seconds (``None`` when unknown), RGB ``(H, W, 3)``."""

    index: int
    time: float | None
    image: np.ndarray


def require_av() -> Any:
    """Import PyAV, or say how to install it."""
    try:
        import av
    except ImportError as err:
        raise ImportError(f"video input needs PyAV, which is not installed: {VIDEO_INSTALL_HINT}") from err
    return av


def is_video_path(path: str | os.PathLike[str]) -> bool:
    """Whether the file name has a video suffix (:data:`VIDEO_SUFFIXES`)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def check_sampling(every: int, max_frames: int | None) -> None:
    """Validate ``every`` (≥ 1: keep every N-th frame) and ``max_frames`` (``None`` or ≥ 1)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a whole number >= 1 (1 keeps every frame, 2 every other), got {every!r}")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"max_frames must be a whole number >= 1 (or None for all frames), got {max_frames!r}")


def _open(path: Path) -> Any:
    av = require_av()
    if not path.is_file():
        raise VideoError(f"video file not found: {path}")
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, ValueError) as err:
        raise VideoError(f"cannot read {path} as a video ({type(err).__name__}: {err}); is it a complete video file?") from err
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path} has no video stream")
    return container


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Open ``path``, read its first video stream's properties and decode its first frame (so an unreadable file
    fails here, before any model loads)."""
    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        try:
            next(container.decode(stream))
        except StopIteration:
            raise VideoError(f"{path} has a video stream but no decodable frame") from None
        except (require_av().FFmpegError, ValueError) as err:
            raise VideoError(f"cannot decode {path}: {type(err).__name__}: {err}") from err
        rate = stream.average_rate or stream.guessed_rate
        return VideoInfo(
            path=path, width=stream.codec_context.width, height=stream.codec_context.height,
            fps=Fraction(rate) if rate else None, frames=stream.frames or None, codec=stream.codec_context.name,
            container=container.format.name,
        )
    finally:
        container.close()


def iter_video_frames(
    path: str | os.PathLike[str], *, every: int = 1, max_frames: int | None = None
) -> Iterator[DecodedFrame]:
    """Decode frames ``0, every, 2·every, ...`` (at most ``max_frames`` of them) one at a time.

    Raises:
        VideoError: unreadable or corrupt file (also mid-stream, naming the last good frame).
    """
    check_sampling(every, max_frames)
    path = Path(path)
    av = require_av()
    container = _open(path)
    kept, index = 0, -1
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame-parallel decoding; order is preserved
        decoded = container.decode(stream)
        while max_frames is None or kept < max_frames:
            try:
                frame = next(decoded)
            except StopIteration:
                break
            except (av.FFmpegError, ValueError) as err:
                raise VideoError(
                    f"{path}: decoding failed after frame {index} ({type(err).__name__}: {err}); the file is corrupt "
                    "or truncated (--max-frames can stop before the damage)"
                ) from err
            index += 1
            if index % every:
                continue
            time = float(frame.time) if frame.time is not None else None
            kept += 1
            yield DecodedFrame(index=index, time=time, image=frame.to_ndarray(format="rgb24"))
    finally:
        container.close()


def _codec_available(name: str) -> bool:
    av = require_av()
    try:
        av.codec.Codec(name, "w")
    except Exception:  # UnknownCodecError and friends: the local FFmpeg build lacks it
        return False
    return True


def output_format(input_path: str | os.PathLike[str] | None) -> tuple[str, str, str]:
    """``(suffix, container format, codec)`` for the overlay video: the input's container where this FFmpeg build
    can encode into it, MP4 (H.264, else MPEG-4 part 2) otherwise."""
    suffix = Path(input_path).suffix.lower() if input_path is not None else ".mp4"
    for candidate in (suffix, ".mp4"):
        if candidate in _CONTAINERS:
            fmt, codecs = _CONTAINERS[candidate]
            for codec in codecs:
                if _codec_available(codec):
                    return candidate, fmt, codec
    raise VideoError("this FFmpeg build has no H.264 or MPEG-4 encoder to write the overlay video")


class VideoWriter:
    """Encode RGB ``uint8`` frames of one size into a video file (``with VideoWriter(...) as w: w.write(rgb)``).

    Odd widths/heights are padded by one edge pixel (4:2:0 chroma needs even sizes); the padding is recorded in
    :attr:`padded`.

    Args:
        path: output file; its suffix should match ``container``.
        fps: frame rate (a Fraction keeps e.g. 30000/1001 exact).
        container, codec: from :func:`output_format`.
        quality: x264/VP9 constant-quality value (lower is better; ignored by MPEG-4, which gets a bit rate).
    """

    def __init__(self, path: str | os.PathLike[str], fps: Fraction | float, container: str = "mp4",
                 codec: str = "libx264", quality: int = 20) -> None:
        av = require_av()
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1_000_000) if fps else Fraction(25)
        try:
            self._container = av.open(str(self.path), mode="w", format=container)
        except (av.FFmpegError, OSError, ValueError) as err:
            raise VideoError(f"cannot write the video {self.path}: {err}") from err
        self.codec, self.quality = codec, quality
        self._stream: Any = None
        self.size: tuple[int, int] | None = None
        self.padded = False
        self.frames = 0

    def _start(self, h: int, w: int) -> None:
        stream = self._container.add_stream(self.codec, rate=self.fps)
        self.padded = bool(h % 2 or w % 2)
        stream.height, stream.width = h + h % 2, w + w % 2
        stream.pix_fmt = "yuv420p"
        if self.codec in ("libx264", "h264"):
            stream.options = {"crf": str(self.quality), "preset": "medium"}
        elif self.codec.startswith("libvpx"):
            stream.options = {"crf": str(self.quality + 11), "b": "0"}
        else:  # MPEG-4 part 2 has no constant-quality mode here: a generous bit rate
            stream.bit_rate = max(1_000_000, int(8 * h * w * float(self.fps)) // 10)
        self._stream, self.size = stream, (h, w)

    def write(self, rgb: np.ndarray) -> None:
        """Append one ``(H, W, 3)`` uint8 frame (every frame must have the first one's size)."""
        av = require_av()
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"frames must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
        if self._stream is None:
            self._start(*rgb.shape[:2])
        if rgb.shape[:2] != self.size:
            raise ValueError(f"frame of size {rgb.shape[:2]} after frames of size {self.size}: one size per video")
        if self.padded:
            rgb = np.pad(rgb, ((0, rgb.shape[0] % 2), (0, rgb.shape[1] % 2), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and close the file."""
        if self._container is None:
            return
        try:
            if self._stream is not None:
                for packet in self._stream.encode(None):
                    self._container.mux(packet)
        finally:
            self._container.close()
            self._container = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
