"""/metrics: the snapshot in Prometheus' text format (one scrape = one snapshot)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PHASES = ("compute", "upload", "wait")


class SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        cycle = snap["cycle"]
        open_ = snap["open"] or {}
        yield _gauge("foldfed_current_step", "The open global step.", snap["current_step"])
        yield _gauge("foldfed_cycle_steps", "Global steps in the cycle.", cycle["steps"])
        yield _gauge("foldfed_steps_closed", "Steps every participant delivered.", cycle["closed"])
        yield _gauge(
            "foldfed_steps_remaining", "Steps of the cycle not closed.", cycle["remaining"]
        )
        yield _gauge(
            "foldfed_cycle_done", "1 once the cycle's final release went out.", float(cycle["done"])
        )
        yield _gauge(
            "foldfed_eta_seconds", "Estimated seconds to the end of the cycle.", snap["eta_s"]
        )
        yield _gauge(
            "foldfed_step_wall_seconds", "Median wall time of recent steps.", snap["step_wall_s"]
        )
        yield _gauge(
            "foldfed_bytes_to_come",
            "Bytes of the open step not yet delivered (delta sizes of those still to deliver).",
            open_.get("bytes_to_come"),
        )
        yield _gauge(
            "foldfed_step_open_seconds",
            "Seconds since the open step was released.",
            open_.get("elapsed_s"),
        )
        rejected = CounterMetricFamily(
            "foldfed_rejected_messages", "Messages the hub rejected (REJECTED events seen)."
        )
        rejected.add_metric([], snap["rejected"])
        yield rejected
        by_reason = CounterMetricFamily(
            "foldfed_rejected_messages_by_reason",
            "The same rejections per reason class (foldfed.rejections).",
            labels=["reason"],
        )
        for reason, count in snap.get("rejected_by_reason", {}).items():
            by_reason.add_metric([reason], count)
        yield by_reason

        per = {
            "delivered": GaugeMetricFamily(
                "foldfed_participant_delivered",
                "1 if it delivered the open step.",
                labels=["participant"],
            ),
            "straggler": GaugeMetricFamily(
                "foldfed_participant_straggler",
                "1 while the monitor deems it a straggler.",
                labels=["participant"],
            ),
            "silent": GaugeMetricFamily(
                "foldfed_participant_silent",
                "1 while no heartbeat came within the timeout.",
                labels=["participant"],
            ),
            "idle": CounterMetricFamily(
                "foldfed_participant_idle_seconds",
                "Seconds the barrier waited for this participant alone (cumulative).",
                labels=["participant"],
            ),
            "projected": GaugeMetricFamily(
                "foldfed_participant_projected_idle_seconds",
                "Barrier idle expected from it over the rest of the cycle.",
                labels=["participant"],
            ),
            "excess": GaugeMetricFamily(
                "foldfed_participant_excess_seconds",
                "Median time to deliver minus the others' median, recent steps.",
                labels=["participant"],
            ),
            "heartbeat": GaugeMetricFamily(
                "foldfed_participant_heartbeat_age_seconds",
                "Seconds since its last heartbeat.",
                labels=["participant"],
            ),
            "bytes": CounterMetricFamily(
                "foldfed_participant_bytes_sent",
                "Bytes it uploaded (cumulative).",
                labels=["participant"],
            ),
        }
        phase = GaugeMetricFamily(
            "foldfed_participant_phase_seconds",
            "Its compute, upload and wait time in the last closed step.",
            labels=["participant", "phase"],
        )
        delivered = set(open_.get("delivered", []))
        for row in snap["table"]:
            p = [row["participant"]]
            per["delivered"].add_metric(p, float(row["participant"] in delivered))
            per["straggler"].add_metric(p, float(row["straggler"]))
            per["silent"].add_metric(p, float(row["silent"]))
            per["idle"].add_metric(p, row["idle_s"])
            per["projected"].add_metric(p, row["projected_idle_s"])
            if row["excess_s"] is not None:
                per["excess"].add_metric(p, row["excess_s"])
            if row["heartbeat_age_s"] is not None:
                per["heartbeat"].add_metric(p, row["heartbeat_age_s"])
            per["bytes"].add_metric(p, row["bytes_sent_total"])
            last = row["last"] or {}
            for name in PHASES:
                value = last.get(f"{name}_s")
                if value is not None:
                    phase.add_metric([row["participant"], name], value)
        yield from per.values()
        yield phase


def _gauge(name: str, text: str, value: float | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, text)
    if value is not None:
        family.add_metric([], float(value))
    return family


def exposition(snapshot: Callable[[], dict[str, Any]]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(registry)
