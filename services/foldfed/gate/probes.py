"""The gate's measurements: everything `foldfed gate check` reads from the world.

Each probe returns the plain measurement a pure judgement in `checks` takes; a probe that
cannot measure says why in the measurement, never by raising, so one broken check does
not hide the others.

How the clock is measured (docs/operating-model.md, "Readiness gating"): RabbitMQ 3.10
gives an AMQP client no reading of its clock (no server time in connection.start, no
broker timestamp on messages without a plugin), and the management API is the hub's,
not the participants'. So the reference is a hub-published time: the `Date` header of an
HTTP(S) URL the hub serves (`--hub-clock`, e.g. the monitor's page), read NTP-style: the
offset against the midpoint of the round trip, uncertain by half the round trip plus the
header's one-second resolution. Without one, the kernel's own NTP discipline
(adjtimex(2)) stands in: a synchronised kernel clock is within its `maxerror` of UTC,
which the hub keeps too; an unsynchronised one is no measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import email.utils
import json
import os
import shutil
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import aio_pika

from foldfed import topology
from foldfed.config import amqp_user
from foldfed.digests import file_digest
from foldfed.gate.checks import (
    BrokerProbe,
    ClockSample,
    ComputeProbe,
    DataProbe,
    SplitProbe,
    offset_from_round_trip,
)
from foldfed.signing import VerifyKey
from foldfed.trainer.backend import TrainerSettings

HTTP_DATE_RESOLUTION_S = 1.0
# adjtimex(2): status bits (not synchronised; offset in ns) and the TIME_ERROR answer.
_STA_UNSYNC = 0x0040
_STA_NANO = 0x2000
_TIME_ERROR = 5


# ---------------------------------------------------------------- broker


async def probe_broker(amqp_url: str, participant: str, timeout_s: float = 15.0) -> BrokerProbe:
    """Connect with the participant's own URL and passively declare its own queue (a
    passive declare needs no configure permission: it only asks whether the queue is
    there)."""
    parsed = urlparse(amqp_url)
    no_verify = parse_qs(parsed.query).get("no_verify_ssl", ["0"])[0] != "0"
    probe = BrokerProbe(
        user=amqp_user(amqp_url),
        scheme=parsed.scheme,
        # aiormq verifies certificate and host name on amqps unless no_verify_ssl is set.
        tls_verified=parsed.scheme == "amqps" and not no_verify,
        connected=False,
        queue_found=False,
    )
    started = time.perf_counter()
    try:
        connection = await aio_pika.connect(amqp_url, timeout=timeout_s)
    except Exception as exc:
        return dataclasses.replace(probe, error=_reason(exc))
    connect_ms = (time.perf_counter() - started) * 1000
    server = _server_name(connection)
    try:
        channel = await connection.channel()
        await channel.declare_queue(topology.participant_queue(participant), passive=True)
        found, error = True, ""
    except Exception as exc:
        found, error = False, _reason(exc)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), 2.0)
    return dataclasses.replace(
        probe,
        connected=True,
        queue_found=found,
        connect_ms=connect_ms,
        server=server,
        error=error,
    )


def _server_name(connection: aio_pika.abc.AbstractConnection) -> str:
    transport = connection.transport
    props = getattr(getattr(transport, "connection", None), "server_properties", None) or {}
    product, version = props.get("product", ""), props.get("version", "")
    text = f"{_text(product)} {_text(version)}".strip()
    return text


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().rstrip(":")


# ---------------------------------------------------------------- clock


def probe_clock(hub_clock_url: str | None) -> ClockSample:
    """This clock against the hub's (module docstring), or the kernel's NTP state."""
    if hub_clock_url:
        return _hub_clock(hub_clock_url)
    return _kernel_clock()


def _hub_clock(url: str, timeout_s: float = 10.0) -> ClockSample:
    source = f"hub {url} (HTTP Date)"
    try:
        sent = time.time()
        with urllib.request.urlopen(
            urllib.request.Request(url, method="HEAD"), timeout=timeout_s
        ) as r:
            received = time.time()
            header = r.headers.get("Date")
    except Exception as exc:
        return ClockSample(source, 0.0, 0.0, usable=False, error=_reason(exc))
    parsed = email.utils.parsedate_to_datetime(header) if header else None
    if parsed is None:
        return ClockSample(source, 0.0, 0.0, usable=False, error="the answer has no Date header")
    offset, uncertainty = offset_from_round_trip(
        sent, received, parsed.timestamp(), HTTP_DATE_RESOLUTION_S
    )
    return ClockSample(source, offset, uncertainty)


class _Timex(ctypes.Structure):
    # struct timex of <sys/timex.h> (Linux): the fields read here, then padding.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("rest", ctypes.c_long * 32),
    ]


def _kernel_clock() -> ClockSample:
    source = "the kernel's NTP discipline (adjtimex)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        timex = _Timex()  # modes = 0: read only
        state = libc.adjtimex(ctypes.byref(timex))
    except (OSError, AttributeError) as exc:
        return ClockSample(source, 0.0, 0.0, usable=False, error=_reason(exc))
    if state < 0 or state == _TIME_ERROR or timex.status & _STA_UNSYNC:
        return ClockSample(
            source, 0.0, 0.0, usable=False, error="the kernel clock is not NTP-synchronised"
        )
    # offset: µs, or ns under STA_NANO; maxerror: µs, the kernel's bound on the error.
    per_second = 1e9 if timex.status & _STA_NANO else 1e6
    return ClockSample(source, timex.offset / per_second, timex.maxerror / 1e6)


# ---------------------------------------------------------------- disk, θ0


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system that holds (or will hold) `folder`."""
    path = Path(folder).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def probe_theta0(path: Path | None) -> tuple[str | None, int, str]:
    """(hex blake3, size, error) of the θ0 file; digest None when there is none."""
    if path is None:
        return None, 0, "FOLDFED_INITIAL_MODEL is not set"
    if not Path(path).is_file():
        return None, 0, f"{path} is not a file"
    return file_digest(Path(path)).hex(), Path(path).stat().st_size, ""


# ---------------------------------------------------------------- data


def probe_data(
    card_path: Path | None, data_dir: Path | None, own_key: VerifyKey, needs_data: bool
) -> DataProbe:
    """The data card's facts: its schema, its signature by `own_key`, and (with
    `data_dir`) whether its manifest digest is that of the structure files there now."""
    if card_path is None:
        return DataProbe(card_given=False, needs_data=needs_data)
    from foldfed.of3.data.datacard import CardSignatureError, manifest_digest, verify_card

    try:
        card = json.loads(Path(card_path).read_text())
        schema, structures, valid = card["schema_version"], card["structures"], card["valid"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return DataProbe(True, needs_data, error=_reason(exc))
    try:
        verify_card(card, [own_key])
        signature_error = ""
    except CardSignatureError as exc:
        signature_error = str(exc)
    matches = None
    if data_dir is not None:
        from foldfed.of3.data.validate import structure_files

        files = structure_files(Path(data_dir))
        matches = manifest_digest(file_digest(p) for p in files) == card.get("manifest_blake3")
    return DataProbe(True, needs_data, schema, signature_error, structures, valid, matches)


# ---------------------------------------------------------------- split


def probe_split(path: Path | None) -> tuple[SplitProbe, dict[str, object] | None]:
    """This site's blind-split reference, from its local split configuration (sample.json
    of `foldfed data sample`, or any JSON with its `partition` block), and the reference
    as the readiness record carries it (None without a configuration)."""
    if path is None:
        return SplitProbe(given=False), None
    from foldfed.errors import ConfigError
    from foldfed.of3.data.split_standard import config_from_partition, split_reference

    try:
        document = json.loads(Path(path).read_text())
        block = document.get("partition", document) if isinstance(document, dict) else None
        if not isinstance(block, dict):
            raise ConfigError("not a JSON object with a partition block")
        reference = split_reference(*config_from_partition(block))
    except (OSError, ValueError, ConfigError) as exc:
        return SplitProbe(True, error=_reason(exc)), None
    published = reference.to_json()
    return SplitProbe(True, reference.reference_hash, published["config"]), published


# ---------------------------------------------------------------- compute


def describe_device() -> str:
    """The accelerators torch sees, else the CPU cores."""
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return f"cuda: {count} x {torch.cuda.get_device_name(0)}"
    return f"cpu ({os.cpu_count()} cores)"


def probe_compute(settings: TrainerSettings) -> ComputeProbe:
    """One timed micro-step of the configured model family: one optimizer step over one
    micro-batch, from θ0, through the trainer's own backend (the model built first, not
    timed)."""
    from foldfed.deltafile import load_delta
    from foldfed.trainer.families import make_backend

    try:
        device = describe_device()
    except Exception as exc:
        return ComputeProbe(settings.model, "unknown device", None, _reason(exc))
    try:
        micro = dataclasses.replace(settings, local_steps=1, grad_accum=1)
        backend = make_backend(micro)
        theta = load_delta(settings.initial_model)
        started = time.perf_counter()
        backend.train(theta, 0, lambda: False)
        return ComputeProbe(settings.model, device, time.perf_counter() - started)
    except Exception as exc:
        return ComputeProbe(settings.model, device, None, _reason(exc))
