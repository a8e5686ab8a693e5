"""Does skipping work below whole layers pay on this CPU? Tile-level convolution on delta frames.

A delta frame (``SpikingNetwork.session``) feeds only the change of the input, so in its steps most of
each layer's input is zero: only the moving object and the receptive fields around it carry events.
The runtime skips a layer's work per sample (a silent row); this benchmark measures the next grain
down, the DeltaCNN / Skip-Convolution idea applied to spikes: compute each conv only on the output
tiles whose receptive field holds an event, gathering those tiles' input patches (with their halo),
convolving them as one batch and scattering the results into a zero output.

On the bundled video's moving-object sequences it captures every conv input of each delta frame's
steps that the runtime computes (bundled YOLOv8n, float32, one thread; a silent input it skips whole already),
then times, per tile size, the dense conv against the
tiled one (the tile mask, gather, conv and scatter all counted), as CPU time of this thread (the
minimum of ``--repeats``, robust to other processes on a shared machine). It prints per tile size the
active tile fraction, the time ratio tiled / dense over all captured calls, the same with the faster of
the two chosen per call (a bound for any per-layer policy), the calls where tiling wins, and the largest
difference from the dense conv (the tiled result must equal it up to float32 summation order).

    python benchmarks/tiles.py                       # 4 delta frames, tiles 4, 8, 16, 32
    python benchmarks/tiles.py --frames 8 --tiles 8 16
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from detector.data.video import render_sequence
from detector.synapses import Synapse
from detector.weights import load_detector


def tiled_conv(x: torch.Tensor, conv: nn.Conv2d, tile: int) -> tuple[torch.Tensor, float]:
    """``conv`` without its bias, computed only on the ``tile`` x ``tile`` output tiles whose receptive field holds
    a non-zero input; returns the output and the fraction of tiles computed."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    n, _, h, w = x.shape
    out_h, out_w = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows, cols = -(-out_h // tile), -(-out_w // tile)
    # An output position reads a (kh, kw) window: pooling the event map over that window marks the outputs that
    # see an event, and pooling those over a tile marks the tiles to compute.
    events = x.ne(0).any(1, keepdim=True).to(x.dtype)
    reach = F.max_pool2d(F.pad(events, (pw, pw, ph, ph)), (dh * (kh - 1) + 1, dw * (kw - 1) + 1), (sh, sw))
    active = F.max_pool2d(reach, tile, tile, ceil_mode=True)[:, 0].flatten(1) > 0  # [n, rows * cols]
    out = x.new_zeros(n, conv.out_channels, rows * tile, cols * tile)
    picked = active.nonzero()
    if len(picked):
        patch_h, patch_w = (tile - 1) * sh + dh * (kh - 1) + 1, (tile - 1) * sw + dw * (kw - 1) + 1
        need_h, need_w = (rows - 1) * tile * sh + patch_h, (cols - 1) * tile * sw + patch_w
        padded = F.pad(x, (pw, max(need_w - w - pw, pw), ph, max(need_h - h - ph, ph)))
        # every tile's patch as a view of the padded input (no copy); indexing copies only the active ones
        s_n, s_c, s_h, s_w = padded.stride()
        patches = padded.as_strided((n, rows, cols, x.shape[1], patch_h, patch_w),
                                    (s_n, tile * sh * s_h, tile * sw * s_w, s_c, s_h, s_w))
        chosen = patches[picked[:, 0], picked[:, 1] // cols, picked[:, 1] % cols]
        computed = F.conv2d(chosen, conv.weight, None, conv.stride, 0, conv.dilation, conv.groups)
        grid = out.view(n, conv.out_channels, rows, tile, cols, tile).permute(0, 2, 4, 1, 3, 5)
        grid[picked[:, 0], picked[:, 1] // cols, picked[:, 1] % cols] = computed
    return out[:, :, :out_h, :out_w], float(active.float().mean())


def capture_delta_inputs(det, frames: list, delta_frames: int) -> list[tuple[nn.Conv2d, torch.Tensor]]:
    """Every (conv, input) of the delta frames' steps (the session's sleep stacks after its keyframe)."""
    captured, recording = [], [False]

    def hook(module, inputs, _output):
        # a silent input is skipped whole by the runtime already; only the convs it computes are candidates
        if recording[0] and module.sim.sleeping and isinstance(module.layer, nn.Conv2d) and inputs[0].any():
            captured.append((module.layer, inputs[0].detach().clone()))

    handles = [m.register_forward_hook(hook) for m in det.snn.modules() if isinstance(m, Synapse)]
    session = det.snn.session(record=False)
    try:
        with torch.no_grad():
            for i, frame in enumerate(frames[:delta_frames + 1]):
                recording[0] = i > 0
                run = session.run(det.preprocess([frame])[0])
                assert run.keyframe == (i == 0), "a delta frame was expected"
    finally:
        for handle in handles:
            handle.remove()
    return captured


def cpu_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="yolov8n-bundled")
    parser.add_argument("--frames", type=int, default=4, help="delta frames captured (after one keyframe)")
    parser.add_argument("--tiles", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=3, help="bundled moving-object sequence")
    args = parser.parse_args()
    torch.set_num_threads(1)
    det = load_detector(args.model)
    frames = [img[..., ::-1].copy() for img, *_ in render_sequence(args.seed, "static", args.frames + 1)]
    calls = capture_delta_inputs(det, frames, args.frames)
    dense = [cpu_seconds(lambda: F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation,
                                          conv.groups), args.repeats) for conv, x in calls]
    nonzero = sum(int(x.ne(0).sum()) for _, x in calls) / sum(x.numel() for _, x in calls)
    print(f"{args.model}: {len(calls)} conv calls in {args.frames} delta frames, {nonzero:.1%} of their inputs "
          f"non-zero; dense conv {sum(dense) * 1e3 / args.frames:.1f} ms CPU per frame (one thread, min of "
          f"{args.repeats})")
    print("| tile | tiles computed | tiled / dense CPU time | the faster of the two per call / dense | calls where "
          "tiling wins | max abs difference |")
    print("|---|---|---|---|---|---|")
    for tile in args.tiles:
        tiled, fractions, wins, error = [], [], 0, 0.0
        for (conv, x), dense_s in zip(calls, dense):
            out, fraction = tiled_conv(x, conv, tile)
            reference = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
            error = max(error, float((out - reference).abs().max()))
            seconds = cpu_seconds(lambda: tiled_conv(x, conv, tile), args.repeats)
            tiled.append(seconds)
            fractions.append(fraction)
            wins += seconds < dense_s
        best = sum(min(a, b) for a, b in zip(tiled, dense))  # an oracle choosing per call: a bound for any policy
        print(f"| {tile} | {sum(fractions) / len(fractions):.1%} | {sum(tiled) / sum(dense):.2f} | "
              f"{best / sum(dense):.2f} | {wins} of {len(calls)} | {error:.1e} |")


if __name__ == "__main__":
    main()
