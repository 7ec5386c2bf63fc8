"""Hostile messages against the running services (issue 14 item 6), over a real broker.

One concept, over 400 lines: the hostile member of a live federation. Its message
strategies, the driver that plays it between the honest members' steps, and what the hub
must show afterwards.

A federation of real processes runs R steps: the aggregator (ingest), the barrier and the
monitor at the hub; org-a and org-b each a trainer and an uploader service. The third
member, org-c, is played by this test: a hostile participant with valid credentials. At
each release it publishes a burst of generated hostile messages (hypothesis) to everything
its broker user may write to:

- the hub's ingest queue (foldfed.hub, key "ingest"): manifests, chunks and have-requests
  with foreign participant names, wrong steps, forged digests, replays of its own earlier
  chunks and manifests, oversized bodies, non-finite and forged weights, bad codec specs,
  non-canonical encodings, undecodable bodies, wrong type headers, no user_id; as org-c,
  whose messages pass the sender check and reach the deep rules of the open step, and as
  org-x, a broker user of the consortium that is not a member;
- the events exchange under the keys its topic permission allows: "participant.model"
  (the barrier's and the monitor's queues) and "uploader.*" (the monitor's): forged model
  reports, hub facts (receipts, finalizations, hub events), undecodable bodies.

Then, once every hostile message was refused, it uploads its honest delta for the step
with `foldfed upload` (the participant's uploader). The same federation also runs without
any hostile message. The test asserts:

- no process died;
- the hostile run's final model (the final release's digest, and the digest org-a and
  org-b report holding) is the undisturbed run's: no state was corrupted;
- every hostile message was refused, with a reason of a known class (foldfed.rejections)
  that its kind allows, and counted: one dead letter per refusal (the barrier and the
  monitor each refuse a bad "participant.model" message), the monitor's per-reason counts
  of the ingest's refusals and of its own, each hub service's "rejections" log line at
  shutdown, and org-c heard of each refusal of its own messages on its queue.

Exact replays are not hostile messages here: the same manifest again is acked as a
duplicate (a restarted uploader asks for its receipt again; docs/format.md section 9).

The federation runs are long scenarios (marker `long`: two whole federations, 4-5 min here):
`make test-long` sends about 700 messages, `make fuzz` (FOLDFED_FUZZ_SCALE=20) about 13,500;
`make test` runs the broker-permission tests below and the decoders' fuzzing (test_fuzz_*).
What may reach a participant's queue is the hub's alone (broker permissions): the last
tests show the broker refuses a participant's publish towards another's queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest
import torch
from fuzzing import EXAMPLES, REASONS, SCALE, fuzz, mutated
from hypothesis import given
from hypothesis import strategies as st

from foldfed import topology
from foldfed.bus import Bus
from foldfed.config import BusSettings
from foldfed.deltafile import load_delta, write_delta
from foldfed.demo.cluster import FederationSpec, LocalFederation
from foldfed.digests import digest_of
from foldfed.domain import (
    CODEC_CODED_VECTOR,
    Chunk,
    DeliveryReceipt,
    Event,
    HaveRequest,
    Heartbeat,
    Manifest,
    ModelReport,
    StepFinalized,
    StepReleased,
    manifest_of,
)
from foldfed.errors import DecodeError
from foldfed.format import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE
from foldfed.messages import decode, encode
from foldfed.payloadfile import plan_chunks, read_chunk
from foldfed.rejections import OTHER, reason_class
from foldfed.trainer.task import initial_model

from conftest import FOLDFED, OUTSIDER, PARTICIPANTS, BrokerHandle, reset_topology

pytestmark = [pytest.mark.broker, pytest.mark.slow]

A, B, C = PARTICIPANTS
HONEST = (A, B)  # trainer + uploader services
STEPS = 2
# Hostile messages of each kind per step (19 kinds, 2 steps): about 700 in `make test-long`,
# FOLDFED_FUZZ_SCALE (20 in `make fuzz`) times as many: over 10,000.
PER_KIND = 24
MODEL_KEY = topology.MODEL_REPORT_KEY
UPLOADER_KEY = "uploader.hostile"
# How many hub services refuse one message, by where it was published.
REFUSERS = {topology.INGEST_ROUTING_KEY: 1, MODEL_KEY: 2, UPLOADER_KEY: 1}
FEDERATION_TIMEOUT_S = 600.0
TYPES = (
    "foldfed.v1.DeltaManifest",
    "foldfed.v1.Chunk",
    "foldfed.v1.HaveRequest",
    "foldfed.v1.HaveReply",
    "foldfed.v1.DeliveryReceipt",
    "foldfed.v1.StepReleased",
    "foldfed.v1.FinalizeRequest",
    "foldfed.v1.StepFinalized",
    "foldfed.v1.ModelReport",
    "foldfed.v1.Event",
    "foldfed.v1.Heartbeat",
)
ANY = frozenset[str]()  # any known class (never OTHER)


@dataclass(frozen=True)
class Hostile:
    """One hostile message: who sends it where, and the reason classes it may get."""

    kind: str
    sender: str
    key: str  # topology.INGEST_ROUTING_KEY, MODEL_KEY or UPLOADER_KEY
    type_name: str
    body: bytes
    allowed: frozenset[str] = ANY
    with_user_id: bool = True

    @property
    def exchange(self) -> str:
        if self.key == topology.INGEST_ROUTING_KEY:
            return topology.HUB_EXCHANGE
        return topology.EVENTS_EXCHANGE


@dataclass
class Context:
    """What org-c knows when step `step` is released: enough to aim at the deep rules."""

    release: StepReleased
    model: dict[str, torch.Tensor]
    honest: Manifest  # org-c's honest manifest for this step (not sent yet)
    previous: Manifest | None = None  # its manifest of the step before (delivered)
    previous_chunks: list[Chunk] = field(default_factory=list)

    @property
    def step(self) -> int:
        return self.release.step

    @property
    def weight(self) -> float:
        return self.release.agreed_weights()[C]


# ----------------------------------------------------------------- hostile strategies


def _ingest(kind: str, msg: Any, allowed: frozenset[str] = ANY, sender: str = C) -> Hostile:
    type_name, body = encode(msg)
    return Hostile(kind, sender, topology.INGEST_ROUTING_KEY, type_name, body, allowed)


FOREIGN = st.sampled_from([A, B, OUTSIDER, "", "hub", "org-c ", "ORG-C", "x" * 70])
DIGESTS = st.binary(min_size=32, max_size=32)


def _forged_digest(body: bytes) -> st.SearchStrategy[bytes]:
    return DIGESTS.filter(lambda d: d != digest_of(body))


@st.composite
def _foreign_sender(draw: st.DrawFn, ctx: Context) -> Hostile:
    """A message that claims another participant than its publisher."""
    who = draw(FOREIGN)
    msg = draw(
        st.sampled_from(
            [
                dataclasses.replace(ctx.honest, participant=who),
                HaveRequest(ctx.step, who, draw(DIGESTS), "r"),
                Chunk(ctx.step, who, 0, digest_of(b"x"), b"x"),
            ]
        )
    )
    return _ingest("foreign-participant", msg, frozenset({"forged-sender"}))


@st.composite
def _outsider(draw: st.DrawFn, ctx: Context) -> Hostile:
    """org-x: a consortium broker user that is no member, as itself or as org-c."""
    claims = draw(st.sampled_from([OUTSIDER, C]))
    msg = draw(
        st.sampled_from(
            [
                dataclasses.replace(ctx.honest, participant=claims),
                HaveRequest(ctx.step, claims, draw(DIGESTS), "r"),
                Chunk(ctx.step, claims, 0, digest_of(b"y"), b"y"),
            ]
        )
    )
    allowed = {OUTSIDER: "unknown-participant", C: "forged-sender"}[claims]
    return _ingest("outsider", msg, frozenset({allowed}), sender=OUTSIDER)


@st.composite
def _wrong_step(draw: st.DrawFn, ctx: Context) -> Hostile:
    step = draw(st.integers(0, 2**63 - 1).filter(lambda s: s != ctx.step))
    msg = draw(
        st.sampled_from(
            [
                dataclasses.replace(ctx.honest, step=step),
                HaveRequest(step, C, draw(DIGESTS), "r"),
                Chunk(step, C, 0, digest_of(b"z"), b"z"),
            ]
        )
    )
    return _ingest("wrong-step", msg, frozenset({"closed-step", "unknown-step"}))


@st.composite
def _forged_chunk(draw: st.DrawFn, ctx: Context) -> Hostile:
    """A chunk of the open step whose body does not hash to the digest it claims."""
    body = draw(st.binary(max_size=256))
    chunk = Chunk(ctx.step, C, draw(st.integers(0, 2**31)), draw(_forged_digest(body)), body)
    return _ingest("forged-digest", chunk, frozenset({"digest-mismatch"}))


WEIGHTS = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 1e9, 5e-324, 1e308])


FLAWS = ("weight", "codec", "tensor", "digests", "size", "base")


@st.composite
def _flawed_manifest(draw: st.DrawFn, ctx: Context, flaw: str) -> Hostile:
    """org-c's honest manifest for the open step with one flaw, so it reaches the deep
    checks (sender, step, base model are right) and must still be refused."""
    m = ctx.honest
    if flaw == "weight":
        bad = draw(WEIGHTS.filter(lambda w: w != ctx.weight))
        return _ingest(
            "weight", dataclasses.replace(m, weight=bad), frozenset({"bad-number", "weight"})
        )
    if flaw == "codec":
        spec = draw(
            st.one_of(
                st.text(max_size=40),
                st.sampled_from(
                    ["int8:v1;block=256", "rotated:v1;bits=2", "fp32:v1", "zstd:v1", "int8:v9"]
                ),
            )
        )
        msg = dataclasses.replace(m, codec=CODEC_CODED_VECTOR, codec_spec=spec or "x")
        return _ingest("bad-codec", msg, frozenset({"codec", "invalid-field", "malformed"}))
    if flaw == "tensor":
        spans = list(m.tensors)
        i = draw(st.integers(0, len(spans) - 1))
        spans[i] = dataclasses.replace(spans[i], name=draw(st.text(min_size=1, max_size=12)))
        msg = dataclasses.replace(m, tensors=tuple(spans))
        return _ingest("foreign-tensor", msg, frozenset({"layout", "invalid-field", "malformed"}))
    if flaw == "digests":
        extra = draw(st.lists(DIGESTS, min_size=1, max_size=3))
        msg = dataclasses.replace(m, chunk_digests=(*m.chunk_digests, *extra))
        return _ingest("chunk-list", msg, frozenset({"invalid-field"}))
    if flaw == "size":
        size = draw(st.sampled_from([0, 1, 2**40, 2**62, m.payload_size + 1]))
        msg = dataclasses.replace(m, payload_size=size)
        return _ingest("payload-size", msg, frozenset({"oversized", "invalid-field"}))
    msg = dataclasses.replace(m, base_model_digest=draw(DIGESTS | st.just(b"")))
    return _ingest("wrong-base", msg, frozenset({"wrong-base-model", "malformed"}))


@st.composite
def _mutated_manifest(draw: st.DrawFn, ctx: Context) -> Hostile:
    """Byte mutations of a manifest whose base model is wrong: whatever the mutation
    leaves, nothing can make it the released model's (32 bytes of blake3)."""
    wrong = dataclasses.replace(ctx.honest, base_model_digest=digest_of(b"not the model"))
    type_name, body = encode(wrong)
    return Hostile(
        "mutated-manifest", C, topology.INGEST_ROUTING_KEY, type_name, draw(mutated(body))
    )


@st.composite
def _mutated_chunk(draw: st.DrawFn, ctx: Context) -> Hostile:
    body = draw(st.binary(min_size=1, max_size=64))
    type_name, encoded = encode(Chunk(ctx.step, C, 0, digest_of(body + b"!"), body))
    return Hostile(
        "mutated-chunk", C, topology.INGEST_ROUTING_KEY, type_name, draw(mutated(encoded))
    )


@st.composite
def _replay(draw: st.DrawFn, ctx: Context) -> Hostile:
    """Its own chunks of the delivered step again (the step is closed), or its delivered
    manifest for the open step (computed on the previous model)."""
    assert ctx.previous is not None
    if ctx.previous_chunks and draw(st.booleans()):
        return _ingest(
            "replay", draw(st.sampled_from(ctx.previous_chunks)), frozenset({"closed-step"})
        )
    msg = dataclasses.replace(ctx.previous, step=ctx.step)
    return _ingest("replay", msg, frozenset({"wrong-base-model", "weight"}))


@st.composite
def _wrong_type(draw: st.DrawFn, ctx: Context) -> Hostile:
    """A type header that is not the body's (or no known type). Bodies are messages of a
    foreign participant for another step, so no reading of them is org-c's open step."""
    foreign = draw(
        st.sampled_from(
            [
                dataclasses.replace(ctx.honest, participant=A, step=ctx.step + 1000),
                Chunk(ctx.step + 1000, A, 1, digest_of(b"w"), b"w"),
                HaveRequest(ctx.step + 1000, A, digest_of(b"m"), "r"),
                StepReleased(ctx.step + 1, digest_of(b"forged model"), PARTICIPANTS),
                Event("rejected", "ingest", A, ctx.step, "forged"),
            ]
        )
    )
    original, body = encode(foreign)
    type_name = draw(
        st.one_of(
            st.sampled_from([t for t in TYPES if t != original]),
            st.text(max_size=30),
        )
    )
    return Hostile("wrong-type", C, topology.INGEST_ROUTING_KEY, type_name, body)


@st.composite
def _undecodable(draw: st.DrawFn, ctx: Context) -> Hostile:
    """Random bytes under any type header, to any place org-c may publish."""
    key = draw(st.sampled_from(list(REFUSERS)))
    type_name = draw(st.sampled_from(TYPES) | st.text(max_size=20))
    return Hostile("undecodable", C, key, type_name, draw(st.binary(max_size=512)))


@st.composite
def _no_user_id(draw: st.DrawFn, ctx: Context) -> Hostile:
    """No user_id property: the hub cannot tell who sent it, so it believes nobody."""
    msg = draw(st.sampled_from([ctx.honest, HaveRequest(ctx.step, C, draw(DIGESTS), "r")]))
    type_name, body = encode(dataclasses.replace(msg, step=msg.step + 1000))
    return Hostile(
        "no-user-id",
        C,
        topology.INGEST_ROUTING_KEY,
        type_name,
        body,
        frozenset({"forged-sender"}),
        with_user_id=False,
    )


@st.composite
def _forged_event(draw: st.DrawFn, ctx: Context) -> Hostile:
    """On the events exchange: facts about someone else, or facts only the hub states."""
    who = draw(FOREIGN)
    digest = draw(DIGESTS)
    choice = draw(st.integers(0, 4))
    if choice == 0:
        msg: Any = ModelReport(draw(st.integers(0, STEPS + 2)), who, digest, {"loss": 1.0})
        allowed = {"forged-sender"}
    elif choice == 1:
        msg = DeliveryReceipt(ctx.step, C, digest, digest, 1, 1, 0, 1)
        allowed = {"hub-only"}
    elif choice == 2:
        msg = StepFinalized(ctx.step, b"", digest, 1.0)
        allowed = {"hub-only", "invalid-field", "malformed"}
    elif choice == 3:
        service = draw(st.sampled_from(["aggregator", "barrier", "ingest", "monitor"]))
        msg = Event("rejected", service, C, ctx.step, "forged")
        allowed = {"hub-only", "wrong-queue"}
    else:
        service = draw(st.sampled_from(["uploader", "trainer"]))
        msg = draw(
            st.sampled_from(
                [
                    Heartbeat(service, who, ctx.step, "uploading"),
                    Event("upload_started", service, who, ctx.step),
                ]
            )
        )
        allowed = {"forged-sender", "wrong-queue"}
    type_name, body = encode(msg)
    key = draw(st.sampled_from([MODEL_KEY, UPLOADER_KEY]))
    return Hostile("forged-event", C, key, type_name, body, frozenset(allowed))


def hostile_kinds(ctx: Context) -> list[st.SearchStrategy[Hostile]]:
    kinds = [
        _foreign_sender(ctx),
        _outsider(ctx),
        _wrong_step(ctx),
        _forged_chunk(ctx),
        *(_flawed_manifest(ctx, flaw) for flaw in FLAWS),
        _mutated_manifest(ctx),
        _mutated_chunk(ctx),
        _wrong_type(ctx),
        _undecodable(ctx),
        _no_user_id(ctx),
        _forged_event(ctx),
    ]
    if ctx.previous is not None:
        kinds.append(_replay(ctx))
    return kinds


def oversized(ctx: Context) -> list[Hostile]:
    """Too big to draw a thousand of: one chunk past the limit, one manifest of 1 TiB."""
    body = b"\0" * (MAX_CHUNK_SIZE + 1)
    big = dataclasses.replace(ctx.honest, payload_size=1 << 40)
    return [
        _ingest(
            "oversized", Chunk(ctx.step, C, 0, digest_of(body), body), frozenset({"oversized"})
        ),
        _ingest("oversized", big, frozenset({"oversized", "invalid-field"})),
    ]


def draw_burst(ctx: Context, per_kind: int) -> list[Hostile]:
    """`per_kind` (times FOLDFED_FUZZ_SCALE) hostile messages of each kind (fewer of a kind
    with fewer distinct messages), drawn by hypothesis with a fixed seed: the same burst
    on every machine."""
    drawn: list[Hostile] = []
    kinds = hostile_kinds(ctx)
    for kind in kinds:

        @fuzz(per_kind)
        @given(kind)
        def collect(message: Hostile) -> None:
            drawn.append(message)

        collect()
    return drawn + oversized(ctx)


# ----------------------------------------------------------------- the federation


@dataclass
class RunResult:
    final_digest: bytes
    reports: dict[str, bytes]  # member -> the θ_{R+1} digest it reported
    sent: list[Hostile]
    dead_letters: list[dict[str, Any]]  # headers + body of each
    own_rejections: int  # "rejected" events org-c found on its queue
    monitor: dict[str, Any]
    logs: dict[str, str]
    died: list[str]


class Hub:
    """The test's view of the broker: releases, reports and dead letters, as admin."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.releases: asyncio.Queue[StepReleased] = asyncio.Queue()
        self.reports: dict[tuple[int, str], bytes] = {}

    async def start(self) -> None:
        self.connection = await aio_pika.connect(self.admin_url)
        channel = await self.connection.channel()
        self.channel = channel
        broadcast = await channel.get_exchange(topology.BROADCAST_EXCHANGE, ensure=False)
        events = await channel.get_exchange(topology.EVENTS_EXCHANGE, ensure=False)
        releases = await channel.declare_queue(exclusive=True, auto_delete=True)
        await releases.bind(broadcast, "")
        await releases.consume(self._on_broadcast, no_ack=True)
        reports = await channel.declare_queue(exclusive=True, auto_delete=True)
        await reports.bind(events, MODEL_KEY)
        await reports.consume(self._on_report, no_ack=True)

    async def _on_broadcast(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if message.type == "foldfed.v1.StepReleased":
            msg = decode(message.type, message.body)
            assert isinstance(msg, StepReleased)
            await self.releases.put(msg)

    async def _on_report(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            msg = decode(message.type or "", message.body)
        except DecodeError:
            return  # a hostile one: the barrier and the monitor refuse it
        # Believed only from the member it is about (RabbitMQ vouches for user_id).
        if isinstance(msg, ModelReport) and message.user_id == msg.participant:
            self.reports[(msg.step, msg.participant)] = msg.model_digest

    async def dead_letter_count(self) -> int:
        queue = await self.channel.declare_queue(topology.DEAD_QUEUE, passive=True)
        return queue.declaration_result.message_count or 0

    async def drain_dead_letters(self) -> list[dict[str, Any]]:
        queue = await self.channel.get_queue(topology.DEAD_QUEUE)
        out = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            out.append({**message.headers, "body": message.body})
        return out

    async def purge(self, queue_name: str) -> None:
        queue = await self.channel.get_queue(queue_name)
        await queue.purge()

    async def close(self) -> None:
        await self.connection.close()


class HostileMember:
    """org-c: publishes bursts as itself (and as org-x), reads its own queue."""

    def __init__(self, broker: BrokerHandle) -> None:
        self.broker = broker
        self.rejections_heard = 0

    async def start(self) -> None:
        self.own = await aio_pika.connect(self.broker.url_for(C))
        self.outsider = await aio_pika.connect(self.broker.url_for(OUTSIDER))
        self.channels = {
            C: await self.own.channel(publisher_confirms=True),
            OUTSIDER: await self.outsider.channel(publisher_confirms=True),
        }

    async def send(self, messages: list[Hostile]) -> None:
        exchanges: dict[tuple[str, str], aio_pika.abc.AbstractExchange] = {}
        for m in messages:
            exchange = exchanges.get((m.sender, m.exchange))
            if exchange is None:
                channel = self.channels[m.sender]
                exchange = await channel.get_exchange(m.exchange, ensure=False)
                exchanges[(m.sender, m.exchange)] = exchange
            message = aio_pika.Message(
                m.body, type=m.type_name, user_id=m.sender if m.with_user_id else None
            )
            await exchange.publish(message, m.key, mandatory=False)

    async def read_own_queue(self) -> None:
        """Count the hub's "rejected" events on org-c's queue, and empty it (what else is
        there is for an uploader, and org-c's uploads start afresh)."""
        channel = await self.own.channel()
        queue = await channel.get_queue(topology.participant_queue(C), ensure=False)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            if message.type == "foldfed.v1.Event":
                event = decode(message.type, message.body)
                if isinstance(event, Event) and event.kind == "rejected":
                    self.rejections_heard += 1
        await channel.close()

    async def close(self) -> None:
        await self.own.close()
        await self.outsider.close()


def honest_delta(workdir: Path, model: dict[str, torch.Tensor], step: int) -> Path:
    """org-c's delta for `step`: small, fixed noise of the model's shapes."""
    g = torch.Generator().manual_seed(1000 + step)
    delta = {name: torch.randn(t.shape, generator=g) * 1e-3 for name, t in model.items()}
    path = workdir / f"org-c-delta-{step}.safetensors"
    write_delta(path, delta)
    return path


def upload_honestly(env: dict[str, str], delta: Path, release: StepReleased) -> None:
    weight = release.agreed_weights()[C]
    args = ["upload", "--delta", str(delta), "--step", str(release.step)]
    args += ["--weight", repr(weight), "--base-model-digest", release.model_digest.hex()]
    done = subprocess.run([*FOLDFED, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def run(broker: BrokerHandle, workdir: Path, per_kind: int) -> RunResult:
    asyncio.run(reset_topology(broker.admin_url))
    spec = FederationSpec(
        participants=PARTICIPANTS,
        steps=STEPS,
        workdir=workdir,
        common_env={"FOLDFED_SEED": "7"},
        monitor_port=0,
    )
    federation = LocalFederation(spec, broker=broker.broker, passwords=broker.passwords)
    federation.start_broker()
    initial_model(federation.initial_model, 7)
    try:
        return asyncio.run(_drive(federation, broker, per_kind))
    finally:
        federation.stop()


async def _drive(federation: LocalFederation, broker: BrokerHandle, per_kind: int) -> RunResult:
    hub = Hub(federation.admin_url)
    member = HostileMember(broker)
    await asyncio.to_thread(federation.start_hub)
    await hub.start()
    for participant in HONEST:
        await asyncio.to_thread(federation.start_participant, participant)
    await member.start()
    env_c = federation.participant_env(C)
    model = load_delta(federation.initial_model)
    sent: list[Hostile] = []
    previous: tuple[Manifest, list[Chunk]] | None = None
    deadline = time.monotonic() + FEDERATION_TIMEOUT_S
    try:
        while True:
            release = await asyncio.wait_for(hub.releases.get(), deadline - time.monotonic())
            if release.final:
                break
            assert release.weights, "the cycle agrees weights (FOLDFED_MEMBER_WEIGHTS)"
            delta = honest_delta(federation.workdir, model, release.step)
            plan = plan_chunks(delta, DEFAULT_CHUNK_SIZE)
            honest = manifest_of(
                plan,
                step=release.step,
                participant=C,
                weight=release.agreed_weights()[C],
                base_model_digest=release.model_digest,
            )
            ctx = Context(release, model, honest)
            if previous is not None:
                ctx.previous, ctx.previous_chunks = previous
            burst = await asyncio.to_thread(draw_burst, ctx, per_kind) if per_kind else []
            await member.send(burst)
            sent += burst
            expected = sum(REFUSERS[m.key] for m in sent)
            await _until(lambda: hub.dead_letter_count(), expected, deadline)
            await member.read_own_queue()
            await asyncio.to_thread(upload_honestly, env_c, delta, release)
            chunks = [
                Chunk(release.step, C, i, d, read_chunk(delta, plan.chunk_size, i))
                for i, d in enumerate(plan.chunk_digests)
            ]
            previous = (honest, chunks)
        final = release
        await _until_reports(hub, STEPS + 1, deadline)
        monitor = await _monitor_state(federation, sent, deadline)
        dead = await hub.drain_dead_letters()
        await member.read_own_queue()
    finally:
        await member.close()
        await hub.close()
    died = [p.name for p in federation.processes.values() if not p.alive()]
    federation.stop()
    logs = {name: p.log() for name, p in federation.processes.items()}
    reports = {p: d for (s, p), d in hub.reports.items() if s == STEPS + 1}
    return RunResult(
        final.model_digest, reports, sent, dead, member.rejections_heard, monitor, logs, died
    )


async def _until(count: Callable[[], Any], expected: int, deadline: float) -> None:
    while (got := await count()) < expected:
        assert time.monotonic() < deadline, f"{got} of {expected} refusals"
        await asyncio.sleep(0.2)


async def _until_reports(hub: Hub, step: int, deadline: float) -> None:
    while not all((step, p) in hub.reports for p in HONEST):
        assert time.monotonic() < deadline, f"no report of step {step}: {hub.reports}"
        await asyncio.sleep(0.2)


async def _monitor_state(
    federation: LocalFederation, sent: list[Hostile], deadline: float
) -> dict[str, Any]:
    """The monitor's /api/state once it has seen every refusal it must count."""
    ingest = sum(1 for m in sent if m.key == topology.INGEST_ROUTING_KEY)
    own = sum(1 for m in sent if m.key != topology.INGEST_ROUTING_KEY)
    url = federation.monitor_url + "api/state"
    while True:
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
        state: dict[str, Any] = json.loads(body)
        if state["rejected"] >= ingest and state["dropped"] >= own:
            return state
        assert time.monotonic() < deadline, (state["rejected"], state["dropped"], ingest, own)
        await asyncio.sleep(0.2)


# ----------------------------------------------------------------- assertions


def _logged_rejections(log: str) -> dict[str, int]:
    for line in log.splitlines():
        if '"rejections"' in line:
            record = json.loads(line)
            if record.get("event") == "rejections":
                return dict(record["by_reason"])
    return {}


@pytest.fixture(scope="module")
def undisturbed(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    return run(broker, tmp_path_factory.mktemp("undisturbed"), per_kind=0)


@pytest.fixture(scope="module")
def hostile(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    return run(broker, tmp_path_factory.mktemp("hostile"), per_kind=PER_KIND)


@pytest.mark.long
def test_no_service_dies_and_the_model_is_the_undisturbed_runs(
    undisturbed: RunResult, hostile: RunResult
) -> None:
    assert not hostile.died and not undisturbed.died, (hostile.died, undisturbed.died)
    assert undisturbed.sent == [] and undisturbed.dead_letters == []
    assert hostile.final_digest == undisturbed.final_digest
    assert hostile.reports == {p: hostile.final_digest for p in HONEST}
    assert undisturbed.reports == {p: undisturbed.final_digest for p in HONEST}
    for name in ("aggregator", "barrier", "monitor"):
        assert "Traceback" not in hostile.logs[name], hostile.logs[name][-4000:]


@pytest.mark.long
def test_every_hostile_message_is_refused_with_a_reason_of_its_kind(hostile: RunResult) -> None:
    # Ten kinds have far more distinct messages than are drawn of them.
    assert len(hostile.sent) >= STEPS * 10 * PER_KIND * SCALE, len(hostile.sent)
    # Each hostile message, as often as services must refuse it, by what the hub sees.
    pending: dict[tuple[str, str, bytes], list[Hostile]] = {}
    for m in hostile.sent:
        sender = m.sender if m.with_user_id else ""
        pending.setdefault((sender, m.type_name, m.body), []).extend([m] * REFUSERS[m.key])
    wrong: list[tuple[str, str]] = []
    classes: Counter[str] = Counter()
    for letter in hostile.dead_letters:
        reason = str(letter[topology.REASON_HEADER])
        key = (
            str(letter[topology.ORIGINAL_SENDER_HEADER]),
            str(letter[topology.ORIGINAL_TYPE_HEADER] or ""),
            letter["body"],
        )
        assert pending.get(key), f"a dead letter nobody hostile sent: {reason} {key[:2]}"
        m = pending[key].pop()
        name = reason_class(reason)
        classes[name] += 1
        if name == OTHER or (m.allowed and name not in m.allowed):
            wrong.append((m.kind, reason))
    assert not wrong, wrong[:20]
    left = [(k[0], k[1]) for k, ms in pending.items() if ms]
    assert not left, f"{len(left)} hostile messages were not refused: {left[:10]}"
    # In `make fuzz`'s closing report (tests/fuzzing.py), beside the decoders' inputs.
    EXAMPLES["hostile messages at the running services"] = len(hostile.sent)
    REASONS["hostile messages at the running services"] = len(hostile.sent)
    kinds = Counter(m.kind for m in hostile.sent)
    print(f"\nhostile messages by kind: {dict(sorted(kinds.items()))}")
    print(f"refusals by reason class: {dict(sorted(classes.items()))}")
    print(
        f"RESULT hostile_messages={len(hostile.sent)} refusals={len(hostile.dead_letters)} "
        f"crashes=0 unclassified=0"
    )


@pytest.mark.long
def test_every_refusal_is_counted_by_the_service_that_refused_it(hostile: RunResult) -> None:
    by_place = Counter(m.key for m in hostile.sent)
    ingest = by_place[topology.INGEST_ROUTING_KEY]
    events = by_place[MODEL_KEY] + by_place[UPLOADER_KEY]
    # Each hub service logs its refusals per class when it stops.
    logged = {
        name: _logged_rejections(hostile.logs[name])
        for name in ("aggregator", "barrier", "monitor")
    }
    assert sum(logged["aggregator"].values()) == ingest, logged
    assert sum(logged["barrier"].values()) == by_place[MODEL_KEY], logged
    assert sum(logged["monitor"].values()) == events, logged
    # The monitor counts the ingest's refusals (its "rejected" events) and its own.
    state = hostile.monitor
    assert state["rejected"] == ingest
    assert state["rejected_by_reason"] == logged["aggregator"]
    assert state["dropped"] == events
    assert state["dropped_by_reason"] == logged["monitor"]
    assert OTHER not in state["rejected_by_reason"] and OTHER not in state["dropped_by_reason"]
    # org-c heard of each refusal of what it sent to the hub as itself (with its user_id:
    # without one the hub cannot tell whom to tell, so it tells nobody).
    own = sum(
        1
        for m in hostile.sent
        if m.key == topology.INGEST_ROUTING_KEY and m.sender == C and m.with_user_id
    )
    assert hostile.own_rejections == own


# ----------------------------------------------------------------- the participant's side


async def _publish_as(broker: BrokerHandle, user: str, exchange: str, key: str) -> None:
    connection = await aio_pika.connect(broker.url_for(user))
    try:
        channel = await connection.channel()
        if exchange:
            target = await channel.get_exchange(exchange, ensure=False)
        else:
            target = channel.default_exchange
        body = encode(Event("rejected", "ingest", A, 1, "forged"))[1]
        await target.publish(
            aio_pika.Message(body, type="foldfed.v1.Event", user_id=user), key, mandatory=False
        )
        await channel.close()  # a refused publish closes the channel: this surfaces it
    finally:
        await connection.close()


@pytest.mark.parametrize(
    ("exchange", "key"),
    [
        (topology.PARTICIPANT_EXCHANGE, A),  # the hub's way to one participant
        (topology.BROADCAST_EXCHANGE, ""),  # the hub's way to all
        ("", topology.participant_queue(A)),  # the default exchange: straight to the queue
        (topology.CONTROL_EXCHANGE, ""),
    ],
    ids=["participant-exchange", "broadcast", "default-exchange", "control"],
)
def test_the_broker_refuses_a_participants_publish_towards_another_participant(
    broker: BrokerHandle, exchange: str, key: str
) -> None:
    """Only the hub writes to a participant's queue, so a participant's handlers never see
    a peer's bytes: the broker refuses the publish (write permission), there is nothing
    of a peer's to fuzz there."""
    asyncio.run(reset_topology(broker.admin_url))

    async def declare() -> None:
        bus = await Bus.connect(BusSettings(broker.admin_url, 10.0, 8), name="topology")
        try:
            await bus.declare_hub_topology(PARTICIPANTS)
        finally:
            await bus.close()

    asyncio.run(declare())
    for user in (C, OUTSIDER):
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            asyncio.run(_publish_as(broker, user, exchange, key))
