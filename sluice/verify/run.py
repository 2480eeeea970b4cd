"""Runs the probes (probes.py) over the services of a running stack, one service at a time, in PROBES' order."""

from __future__ import annotations

import time
from collections.abc import Callable

from sluice.errors import SluiceError
from sluice.stack import Stack, ready
from sluice.verify.probes import PROBES, Target
from sluice.verify.report import KNOBS, Check, Verdict
from sluice.verify.traffic import Shapes, Traffic


def selected(stack: Stack, services: list[str] | None, knobs: list[str] | None) -> tuple[list[str], list[str]]:
    """The services and knobs to probe: all unless narrowed; an unknown name is an error naming it."""
    for name in services or ():
        stack.service(name)
    for knob in knobs or ():
        if knob not in KNOBS:
            raise SluiceError(f"--knob {knob!r} is not a knob (knobs: {', '.join(KNOBS)})")
    return list(services or stack.names()), [knob for knob in KNOBS if not knobs or knob in knobs]


async def verify(stack: Stack, services: list[str], knobs: list[str],
                 progress: Callable[[str], None] = lambda _: None) -> list[Check]:
    if not ready(stack.gateway):
        raise SluiceError(f"no ready gateway at {stack.gateway}: start the stack (sluice up), pass --gateway, "
                          "or let verify start it with --up")
    checks: list[Check] = []
    for name in services:
        service = stack.service(name)
        target = Target(stack, service, Traffic(stack.gateway, stack.headers, Shapes(service)))
        try:
            for judged, probe in PROBES:
                wanted = [knob for knob in judged if knob in knobs]
                if not wanted:
                    continue
                progress(f"{name}: {', '.join(wanted)}")
                started = time.monotonic()
                try:
                    found = await probe(target)
                except SluiceError as error:
                    found = [Check(name, knob, getattr(service.runtime, knob), "probe failed", Verdict.FAIL,
                                   str(error)) for knob in judged]
                took = time.monotonic() - started
                checks += [_timed(check, took) for check in found if check.knob in wanted]
        finally:
            await target.traffic.close()
    return checks


def _timed(check: Check, seconds: float) -> Check:
    return Check(check.service, check.knob, check.configured, check.measured, check.verdict, check.how,
                 round(seconds, 2))
