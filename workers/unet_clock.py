"""Time spent inside the UNet, for `unet_share`: the share of a chunk's wall time the denoiser ran.

The duty cycle counts a pipeline call as busy from start to end, host work in diffusers included (text
encoding, the scheduler, preparing inputs, decoding), and on a GPU a call may even return before its
kernels ran. The UNet's own time is the honest measure of how well the GPU is fed: measured with a
forward pre-hook and hook on the module the pipelines call, which, for a compiled model, is the compiled
wrapper (torch.compile's OptimizedModule), so the hooks run outside the compiled code and change no
graph. On a GPU each call is timed by CUDA events recorded on the stream (nothing waits for them until
the clock is read); on the CPU by perf_counter around the call, which runs synchronously.

Counted: the UNet of the model's pipelines (every derived pipeline shares the one module, Kandinsky's
decoder too). Not counted: a ControlNet, Kandinsky's prior, the VAE, the text encoders.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType
from typing import Any

import torch

log = logging.getLogger(__name__)


def denoiser_of(pipeline: Any) -> torch.nn.Module | None:
    denoiser = getattr(pipeline, "unet", None)
    return denoiser if isinstance(denoiser, torch.nn.Module) else None


class UnetClock:
    """`with UnetClock(pipeline, cuda) as clock: ...` then clock.seconds(): the time inside the UNet's
    calls made in the block (the pipelines are called from one thread). `cuda`: the model runs on a GPU
    (with cpu_offload its weights are on the CPU between calls)."""

    def __init__(self, pipeline: Any, cuda: bool) -> None:
        self.denoiser = denoiser_of(pipeline)
        self.cuda = cuda
        self.calls = 0
        self._cpu_s = 0.0
        self._started: float | None = None
        self._spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._start: torch.cuda.Event | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> UnetClock:
        if self.denoiser is not None:
            self._handles = [
                self.denoiser.register_forward_pre_hook(self._before),
                self.denoiser.register_forward_hook(self._after),
            ]
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _before(self, module: Any, args: Any) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._started = time.perf_counter()

    def _after(self, module: Any, args: Any, output: Any) -> None:
        self.calls += 1
        if self.cuda:
            if self._start is not None:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._spans.append((self._start, end))
                self._start = None
        elif self._started is not None:
            self._cpu_s += time.perf_counter() - self._started
            self._started = None

    def seconds(self) -> float:
        """Seconds inside the UNet's completed calls. On a GPU this waits for the last call's kernels,
        done by the time a chunk has written its outputs."""
        if not self.cuda:
            return self._cpu_s
        if not self._spans:
            return 0.0
        try:
            self._spans[-1][1].synchronize()
            return float(sum(start.elapsed_time(end) for start, end in self._spans)) / 1000
        except RuntimeError:
            # A GPU error stopped the run; the chunk's own error says what, and its time goes uncounted.
            log.warning("the UNet's time could not be read", exc_info=True)
            return 0.0
