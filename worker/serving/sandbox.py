"""Decoder processes: image, audio and video files decoded under a CPU-time and memory budget per request.

A browser's media sandbox is the model. Each decoder process runs one decode at a time under
RLIMIT_AS (its idle address space plus ``memory_mib``) and RLIMIT_CPU (``cpu_seconds`` more than
it had used). A decode over its memory gets MemoryError or ENOMEM inside the decoder, answered
``payload_too_large`` or ``undecodable_input``; one over its CPU time is killed by the kernel
(SIGXCPU), one stuck past ``3 x cpu_seconds`` of wall time by this module, and a crash ends only
that process: each is answered with a typed error and the process is replaced. The worker never
unpickles what a decoder sends: replies are a JSON header and raw pixel or sample bytes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import multiprocessing
import queue
import resource
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from PIL import Image

from schemas.errors import InferenceError
from worker.errors import InvalidRequest, PayloadTooLarge, UndecodableInput
from worker.serving.decoding import bound_pillow, decode_audio, decode_image
from worker.serving.media_limits import MediaLimits
from worker.serving.video_files import Clip, probe_video, read_frames

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: How long a new decoder process may take to import its libraries and say it is ready.
_STARTUP_S = 120.0
_ERRORS: dict[str, type[InferenceError]] = {
    cls.code.value: cls for cls in (PayloadTooLarge, UndecodableInput, InvalidRequest)
}


@dataclass(frozen=True)
class Budget:
    """What one decode may spend: CPU seconds, and MiB of address space over the decoder's idle size."""

    cpu_seconds: float
    memory_mib: int


def _address_space() -> int:
    """This process's virtual size in bytes (VmSize): imported libraries map hundreds of MiB unused."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _decode(header: dict[str, Any], raw: bytes, limits: MediaLimits) -> tuple[dict[str, Any], list[bytes]]:
    """One decode in the decoder process: the reply header and its byte buffers."""
    kind = header["kind"]
    if kind == "image":
        image = decode_image(raw, limits, header["what"], header["max_pixels"])
        return {"size": list(image.size)}, [image.tobytes()]
    if kind == "audio":
        array, rate = decode_audio(raw, limits)
        return {"rate": rate}, [array.astype(np.float32, copy=False).tobytes()]
    if kind == "frames":
        frames = read_frames(raw, [int(i) for i in header["indices"]], limits.av)
        return {"sizes": [list(frame.size) for frame in frames]}, [frame.tobytes() for frame in frames]
    clip = probe_video(raw, limits.av)
    return {
        "total_frames": clip.total_frames,
        "fps": clip.fps,
        "width": clip.width,
        "height": clip.height,
    }, []


def _widen(conn: Connection) -> None:
    """The pipe under ``conn`` as wide as the system allows (Linux's default most: 1 MiB)."""
    try:
        with open("/proc/sys/fs/pipe-max-size") as limit:
            fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, int(limit.read()))
    except OSError:
        pass  # a narrower pipe is only slower


def serve(requests: Connection, replies: Connection, limits: MediaLimits, budget: Budget) -> None:
    """A decoder process's loop: set its limits, then answer one decode at a time until the pipe closes."""
    bound_pillow(limits)
    ceiling = _address_space() + budget.memory_mib * MIB
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, ceiling))
    replies.send_bytes(b"ready")
    while True:
        try:
            header, raw = json.loads(requests.recv_bytes()), requests.recv_bytes()
        except EOFError:
            return
        usage = resource.getrusage(resource.RUSAGE_SELF)
        # RLIMIT_CPU counts the process's whole life: each decode moves the soft limit past what is used.
        cpu = math.ceil(usage.ru_utime + usage.ru_stime + budget.cpu_seconds)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, resource.RLIM_INFINITY))
        buffers: list[bytes] = []
        try:
            reply, buffers = _decode(header, raw, limits)
        except InferenceError as exc:
            reply = {"code": exc.code.value, "message": exc.message}
        except MemoryError:
            reply = {
                "code": PayloadTooLarge.code.value,
                "message": f"decoding needs more than its {budget.memory_mib} MiB budget",
            }
        except Exception as exc:  # a defect, not the file's fault: answered internal, the process kept
            log.exception("decoding failed")
            reply = {"code": "internal", "message": f"{type(exc).__name__} while decoding"}
        reply["buffers"] = len(buffers)
        replies.send_bytes(json.dumps(reply).encode())
        for buffer in buffers:
            replies.send_bytes(buffer)


class _Breach(Exception):
    """The decoder process stopped answering (killed, crashed or stuck): the request gets ``error``."""

    def __init__(self, error: InferenceError) -> None:
        super().__init__(error.message)
        self.error = error


class _Decoder:
    """One decoder process and the parent's end of its pipe."""

    def __init__(self, context: Any, limits: MediaLimits, budget: Budget) -> None:
        # Two one-way OS pipes, widened: a 1080p image is 6 MB of RGB, and through the default 64 KiB
        # buffers its transfer takes about a hundred context switches.
        self.replies, reply_end = context.Pipe(duplex=False)
        request_end, self.requests = context.Pipe(duplex=False)
        for end in (self.replies, self.requests):
            _widen(end)
        self.process = context.Process(
            target=serve, args=(request_end, reply_end, limits, budget), name="decoder", daemon=True
        )
        self.process.start()
        request_end.close()
        reply_end.close()
        self.ready = False
        self.budget = budget

    def call(self, header: dict[str, Any], raw: bytes) -> tuple[dict[str, Any], list[bytes]]:
        """Send one decode and wait for its reply; raise _Breach if the process does not answer."""
        if not self.ready:
            if not self.replies.poll(_STARTUP_S) or self.replies.recv_bytes() != b"ready":
                raise RuntimeError(f"a decoder process did not start (exit code {self.process.exitcode})")
            self.ready = True
        wall = 3 * self.budget.cpu_seconds
        try:
            self.requests.send_bytes(json.dumps(header).encode())
            self.requests.send_bytes(raw)
            if not self.replies.poll(wall):
                raise _Breach(PayloadTooLarge(f"decoding took more than {wall:g} s"))
            reply = json.loads(self.replies.recv_bytes())
            return reply, [self.replies.recv_bytes() for _ in range(int(reply["buffers"]))]
        except (EOFError, OSError):
            self.process.join(5)
            raise _Breach(self._death()) from None

    def _death(self) -> InferenceError:
        if self.process.exitcode == -signal.SIGXCPU:
            return PayloadTooLarge(f"decoding needs more than its {self.budget.cpu_seconds:g} CPU seconds")
        return UndecodableInput(f"the decoder stopped on this file (exit code {self.process.exitcode})")

    def kill(self) -> None:
        """End the process at once (its request is answered already)."""
        self.process.kill()
        self.process.join(5)
        self.requests.close()
        self.replies.close()


def _rgb(size: list[int], pixels: bytes, max_pixels: int, what: str) -> Image.Image:
    """An RGB image from a decoder's reply, its size checked against the bytes and the limit."""
    width, height = (int(side) for side in size)
    if width * height > max_pixels or len(pixels) != width * height * 3:
        raise UndecodableInput(f"{what}: the decoder answered {width}x{height} with {len(pixels)} bytes")
    return Image.frombytes("RGB", (width, height), pixels)


class DecoderPool:
    """A few decoder processes, started on first use; a breach replaces only the process that breached.

    Its methods block (they run in the worker's executor threads) and match decoding.InProcess.
    """

    def __init__(self, limits: MediaLimits, processes: int, budget: Budget) -> None:
        self.limits = limits
        self.processes = processes
        self.budget = budget
        # spawn: a fork of the worker would copy its ONNX sessions, threads and Kafka sockets.
        self._context = multiprocessing.get_context("spawn")
        self._idle: queue.Queue[_Decoder] = queue.Queue()
        self._lock = threading.Lock()
        self._started = False
        self.breaches = 0

    def _call(self, header: dict[str, Any], raw: bytes) -> tuple[dict[str, Any], list[bytes]]:
        with self._lock:
            if not self._started:
                for _ in range(self.processes):
                    self._idle.put(_Decoder(self._context, self.limits, self.budget))
                self._started = True
        decoder = self._idle.get()
        try:
            reply, buffers = decoder.call(header, raw)
        except _Breach as breach:
            self.breaches += 1
            log.warning("decoder process replaced: %s", breach.error.message)
            decoder.kill()
            decoder = _Decoder(self._context, self.limits, self.budget)
            raise breach.error from None
        except BaseException:  # it did not start, or the pipe broke: never reused
            decoder.kill()
            decoder = _Decoder(self._context, self.limits, self.budget)
            raise
        finally:
            self._idle.put(decoder)
        if "code" in reply:
            error = _ERRORS.get(reply["code"])
            if error is None:
                raise RuntimeError(
                    f"decoder process: {reply['message']}"
                )  # the intake's catch-all answers internal
            raise error(str(reply["message"]))
        return reply, buffers

    def image(self, raw: bytes, what: str, max_pixels: int) -> Image.Image:
        """An image file -> RGB, decoded in a decoder process."""
        reply, (pixels,) = self._call({"kind": "image", "what": what, "max_pixels": max_pixels}, raw)
        return _rgb(reply["size"], pixels, max_pixels, what)

    def audio(self, raw: bytes) -> tuple[np.ndarray, int]:
        """An audio file -> mono float32 samples and their rate, decoded in a decoder process."""
        reply, (samples,) = self._call({"kind": "audio"}, raw)
        return np.frombuffer(samples, dtype=np.float32).copy(), int(reply["rate"])

    def video(self, raw: bytes) -> Clip:
        """A video file probed in a decoder process; the frames the processor asks for are decoded there too."""
        reply, _ = self._call({"kind": "video"}, raw)
        fps = None if reply["fps"] is None else float(reply["fps"])
        size = (int(reply["width"]), int(reply["height"]))
        return Clip(raw, int(reply["total_frames"]), fps, *size, self.limits.av, reader=self.frames)

    def frames(self, raw: bytes, indices: Sequence[int]) -> list[Image.Image]:
        """A video file's frames at ``indices`` as RGB images, decoded in a decoder process."""
        reply, buffers = self._call({"kind": "frames", "indices": list(indices)}, raw)
        if len(reply["sizes"]) != len(indices) or len(buffers) != len(indices):
            raise UndecodableInput(f"video: the decoder answered {len(buffers)} frames for {len(indices)}")
        limit = self.limits.max_video_pixels
        return [
            _rgb(size, pixels, limit, "video frame")
            for size, pixels in zip(reply["sizes"], buffers, strict=True)
        ]

    def close(self) -> None:
        """Stop every decoder process (the worker is stopping)."""
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                return
