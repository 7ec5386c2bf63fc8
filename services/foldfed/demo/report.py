"""The end-of-run summary a person reads, and the pictures they would rather look at."""

from __future__ import annotations

from pathlib import Path

from foldfed.demo.observer import RunRecord
from foldfed.digests import short


def human_bytes(n: float) -> str:
    """1.2 kB, 3.4 MB, 1.5 GB: the demo's model is tiny, the consortium's is not."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def step_wall_times(record: RunRecord) -> dict[int, float]:
    """Release of step t to release of step t+1 (the global step's wall time)."""
    out: dict[int, float] = {}
    for step in range(1, record.steps + 1):
        start = record.step(step).opened_at
        end = record.step(step + 1).opened_at
        if start is not None and end is not None:
            out[step] = end - start
    return out


def release_latencies_ms(record: RunRecord) -> dict[int, float]:
    """Last delivery of step t to the release of step t+1, as an observer sees it: the
    barrier's and aggregator's whole share of a step's wall time."""
    out: dict[int, float] = {}
    for step in range(1, record.steps + 1):
        delivered = [s.delivered_at for s in record.step(step).participants.values()]
        released = record.step(step + 1).opened_at
        if delivered and None not in delivered and released is not None:
            out[step] = 1000 * (released - max(d for d in delivered if d is not None))
    return out


def summary_text(record: RunRecord) -> str:
    walls = step_wall_times(record)
    names = record.participants
    lines = ["", "foldfed demo: summary", ""]
    header = f"{'step':>4} {'wall s':>7} | " + " | ".join(f"{p:^23}" for p in names)
    lines += [
        header,
        f"{'':>4} {'':>7} | "
        + " | ".join(f"{'compute':>7} {'upload':>7} {'wait':>7}" for _ in names),
    ]
    for step in range(1, record.steps + 1):
        entry = record.step(step)
        cells = []
        for p in names:
            s = entry.of(p)
            cells.append(f"{s.compute_s:7.2f} {s.upload_s:7.2f} {s.wait_s:7.2f}")
        lines.append(f"{step:>4} {walls.get(step, float('nan')):7.2f} | " + " | ".join(cells))
    total_bytes = sum(
        s.bytes_sent for e in record.by_step.values() for s in e.participants.values()
    )
    lines += ["", f"bytes uploaded in all: {human_bytes(total_bytes)}"]
    latencies = sorted(release_latencies_ms(record).values())
    if latencies:
        median = latencies[len(latencies) // 2]
        lines.append(
            f"release latency after the last delivery: median {median:.0f} ms, "
            f"max {latencies[-1]:.0f} ms"
        )
    lines += _loss_lines(record)
    lines += _digest_lines(record)
    return "\n".join(lines)


def _loss_lines(record: RunRecord) -> list[str]:
    lines = ["", "held-out loss (global test set) after each release:"]
    for step in range(1, record.steps + 2):
        values = [
            r.metrics.get("global_eval_loss")
            for (s, _p), r in record.reports.items()
            if s == step and r.metrics.get("global_eval_loss") is not None
        ]
        if values:
            mean = sum(v for v in values if v is not None) / len(values)
            lines.append(f"  model of step {step:>2}: {mean:.4f}")
    return lines


def _digest_lines(record: RunRecord) -> list[str]:
    final = record.steps + 1
    digests = {p: r.model_digest for (s, p), r in record.reports.items() if s == final}
    expected = record.expected_models.get(final)
    distinct = set(digests.values())
    lines = [""]
    if len(digests) == len(record.participants) and len(distinct) == 1:
        (digest,) = distinct
        agree = "" if expected in (None, digest) else f" (HUB EXPECTED {short(expected)}!)"
        lines.append(f"all {len(digests)} participants hold model {digest.hex()}{agree}")
    else:
        lines.append("participants DISAGREE on the final model:")
        lines += [f"  {p}: {d.hex()}" for p, d in sorted(digests.items())]
    lines += [f"MISMATCH: {m}" for m in record.mismatches]
    return lines


def save_loss_curve(record: RunRecord, path: Path) -> Path:
    """Per participant: held-out loss of the model each release produced."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for p in record.participants:
        points = sorted(
            (s, r.metrics["global_eval_loss"])
            for (s, q), r in record.reports.items()
            if q == p and "global_eval_loss" in r.metrics
        )
        if points:
            left.plot(*zip(*points, strict=True), marker="o", label=p)
        train = sorted(
            (s, e.of(p).train_loss)
            for s, e in record.by_step.items()
            if e.of(p).train_loss is not None
        )
        if train:
            right.plot(*zip(*train, strict=True), marker="o", label=p)
    left.set(title="held-out loss of the released model", xlabel="release", ylabel="loss")
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set(title="local training loss", xlabel="global step", ylabel="loss")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_timeline(record: RunRecord, path: Path) -> Path:
    """Per step and participant: compute, upload and wait, stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = record.participants
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.5 * len(names) * record.steps**0.5))
    y = 0
    ticks, labels = [], []
    for step in range(1, record.steps + 1):
        for p in names:
            s = record.step(step).of(p)
            left = 0.0
            for value, colour, label in (
                (s.compute_s, "tab:blue", "compute"),
                (s.upload_s, "tab:orange", "upload"),
                (s.wait_s, "tab:gray", "wait"),
            ):
                ax.barh(y, value, left=left, color=colour, label=label if y == 0 else None)
                left += value
            ticks.append(y)
            labels.append(f"step {step} {p}")
            y += 1
        y += 0.5
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="seconds", title="where each participant's time went")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# The demo's codec choices: (uplink spec, downlink spec). rot2+zstd is docs/format.md's
# recommendation: 2-bit rotated codes with shared ranges up (maskable), own ranges down.
# init = mult · K · lr = 2 · 10 · 1e-3: the first step's agreed ranges (format.md 14.6.1);
# with 0.001 the first step saturated (held-out loss after it 0.305 against fp32's 0.161).
CODECS: dict[str, tuple[str, str]] = {
    "fp32": ("fp32:v1", "fp32:v1"),
    "rot2+zstd": (
        "rotated:v1;bits=2;block=4096;floor=0.01;init=0.02;mult=2.0;rounding=stochastic;"
        "scale=shared+zstd:v1;level=3",
        "rotated:v1;bits=2;block=4096;mult=2.0;rounding=stochastic;scale=block+zstd:v1;level=3",
    ),
}


def codec_env(name: str) -> dict[str, str]:
    """The hub's variables for a demo codec choice; ValueError for an unknown name."""
    if name not in CODECS:
        raise ValueError(f"unknown demo codec {name!r} (known: {', '.join(CODECS)})")
    up, down = CODECS[name]
    return {"FOLDFED_CODEC": up, "FOLDFED_DOWNLINK_CODEC": down}


def wire_text(record: RunRecord, hub_dir: Path) -> str:
    """Bytes on the wire per direction, and the ratio against fp32 payloads of the same
    updates (the hub's applied update files are exactly fp32-sized payloads; retention
    keeps at least the last one). The downlink is counted from the finalized updates'
    manifests, which the run's events carry, not from files retention may have deleted."""
    updates = sorted((hub_dir / "updates").glob("update-*.safetensors"))
    if not updates or not record.update_bytes:
        return "wire: no update was finalized"
    fp32 = updates[-1].stat().st_size  # one fp32 payload: every update has the same tensors
    down = sum(record.update_bytes.values())
    count = len(record.update_bytes)
    sent = [s.bytes_sent for e in record.by_step.values() for s in e.participants.values()]
    up = sum(sent)
    lines = [
        f"wire: uplink {human_bytes(up)} in {len(sent)} deltas "
        f"({fp32 * len(sent) / max(up, 1):.2f}x fewer than fp32)",
        f"wire: downlink {human_bytes(down)} in {count} updates "
        f"({fp32 * count / max(down, 1):.2f}x fewer than fp32)",
    ]
    return "\n".join(lines)
