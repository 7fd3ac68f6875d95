"""Loss cost against candidates per request N and batch size: the measured form of O(D·N) vs O(D·N²).

For each loss, N and batch size B, one forward + backward of the loss alone on random scores
(2-stage layout for N divisible by 4 groups, else 3-stage by 5 groups; group size N / groups). Each
measurement runs in a forked child, so its peak memory is that child's own: peak RSS growth on CPU,
peak allocated bytes on CUDA. Writes a markdown table and a log-log PNG.

    python tools/profile_loss_scaling.py [--losses lcron,bce,...] [--sizes 40 50 100 200 500] \\
        [--batch-sizes 64 256] [--out runs/profile-loss-scaling]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from pathlib import Path

import torch

from lcron_dist.losses import LOSSES, build_loss


def _layout(n: int) -> tuple[int, int]:
    """(num_stages, group size) whose candidate layout has n items."""
    if n % 4 == 0:
        return 2, n // 4
    if n % 5 == 0:
        return 3, n // 5
    raise SystemExit(f"N={n} is neither 4 nor 5 groups of equal size")


def _inputs(b: int, n: int, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, int]:
    stages, size = _layout(n)
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(b, n, generator=g).to(device).requires_grad_() for _ in range(stages)]
    groups = n // size
    negative = [8, 7, 6, 5][-(groups - 1):]  # labels of the negative groups, in order
    positive = (30 - torch.arange(1, size + 1)).clamp(min=10)
    row = torch.cat([positive] + [torch.full((size,), v) for v in negative])
    relevance = row.expand(b, n).to(device)
    mask = torch.ones(b, n, dtype=torch.bool, device=device)
    return scores, relevance, mask, stages


def _measure(loss: str, b: int, n: int, device: str, repeats: int, queue: mp.Queue) -> None:
    dev = torch.device(device)
    scores, relevance, mask, stages = _inputs(b, n, dev)
    fn = build_loss(loss, num_stages=stages, group_size=n // (4 if stages == 2 else 5)).to(dev)
    # The baseline is taken before the first pass: after it, the allocator would already hold the peak.
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn(scores=scores, relevance=relevance, mask=mask).total.backward()  # warm-up, untimed
    start = time.perf_counter()
    for _ in range(repeats):
        for s in scores:
            s.grad = None
        fn(scores=scores, relevance=relevance, mask=mask).total.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    queue.put(((time.perf_counter() - start) / repeats, max(peak, 0)))


def measure(loss: str, b: int, n: int, device: str, repeats: int) -> tuple[float, int]:
    """(seconds per forward + backward, peak bytes) of one configuration, in a fresh forked child."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_measure, args=(loss, b, n, device, repeats, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def plot(rows: list[tuple], batch: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for loss in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == loss and r[1] == batch]
        axes[0].loglog([r[2] for r in mine], [r[3] * 1000 for r in mine], marker="o", label=loss)
        axes[1].loglog([r[2] for r in mine], [max(r[4], 1) / 2**20 for r in mine], marker="o", label=loss)
    for ax, label in zip(axes, ("forward + backward ms", "peak MiB")):
        ax.set_xlabel("candidates per request N")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title(f"time, batch {batch}")
    axes[1].set_title(f"memory, batch {batch}")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--sizes", type=int, nargs="+", default=[40, 50, 100, 200, 500])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/profile-loss-scaling"))
    args = parser.parse_args()
    losses = [m.strip() for m in args.losses.split(",") if m.strip()]
    unknown = [m for m in losses if m not in LOSSES]
    if unknown:
        parser.error(f"unknown loss(es) {unknown}; choose from {', '.join(LOSSES)}")

    rows = []
    for loss in losses:
        for b in args.batch_sizes:
            for n in args.sizes:
                seconds, peak = measure(loss, b, n, args.device, args.repeats)
                rows.append((loss, b, n, seconds, peak))
                print(f"  {loss:<16} B={b:<4} N={n:<4} {seconds * 1000:9.1f} ms {peak / 2**20:9.1f} MiB", flush=True)

    lines = [f"device {args.device}, torch threads {torch.get_num_threads()}; forward + backward of the loss alone; "
             f"peak = {'allocated bytes' if args.device.startswith('cuda') else 'peak RSS growth of a fresh process'}", "",
             "| loss | B | " + " | ".join(f"N={n} ms / MiB" for n in args.sizes) + " |",
             "|---|---|" + "---|" * len(args.sizes)]
    for loss in losses:
        for b in args.batch_sizes:
            cells = [f"{r[3] * 1000:.1f} / {r[4] / 2**20:.1f}" for r in rows if r[0] == loss and r[1] == b]
            lines.append(f"| {loss} | {b} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loss_scaling.md").write_text(text + "\n")
    plot(rows, args.batch_sizes[-1], args.out / "loss_scaling.png")
    print(f"\n{text}\n\nwritten to {args.out}/loss_scaling.md and loss_scaling.png")


if __name__ == "__main__":
    main()
