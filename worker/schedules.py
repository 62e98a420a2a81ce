"""Cron schedules in a time zone: fire times and the data interval each one closes.

A schedule is a cron expression (five fields, or six with seconds first, or an
alias such as ``@hourly``) read in an IANA time zone, so ``0 2 * * *`` in
``Europe/Paris`` fires at 02:00 Paris time on both sides of a DST change. On
the spring-forward day a time that does not exist fires at the first instant
after the gap; on the fall-back day an hourly schedule fires at both 02:00s.
Fire times are returned in UTC. croniter does the calendar arithmetic.

A scheduled run covers the **data interval** that ends at its fire time and
starts at the schedule's previous fire time: the 10:00 run of an hourly
schedule covers ``[09:00, 10:00)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, croniter

#: croniter's aliases, spelled out in errors.
ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_TINY = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class Interval:
    """A run's data interval ``[start, end)``, in UTC; ``end`` is the fire time."""

    start: datetime
    end: datetime


def check_timezone(name: str) -> ZoneInfo:
    """The zone called ``name``; a ValueError that says what is accepted otherwise."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        msg = f"unknown time zone {name!r}: use an IANA name such as UTC or Europe/Paris"
        raise ValueError(msg) from None


@dataclass(frozen=True, slots=True)
class Schedule:
    """A cron expression read in ``timezone``."""

    expression: str
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        check_timezone(self.timezone)
        fields = self.expression.split()
        if not fields:
            raise ValueError("empty cron expression")
        if fields[0].startswith("@"):
            if len(fields) != 1 or fields[0].lower() not in ALIASES:
                msg = f"unknown alias {self.expression!r} (known: {', '.join(ALIASES)})"
                raise ValueError(msg)
        elif len(fields) not in (5, 6):
            msg = (
                f"cron expression {self.expression!r} has {len(fields)} fields: use 5 "
                "(minute hour day month weekday) or 6 (second first)"
            )
            raise ValueError(msg)
        try:
            self._iter(datetime.now(UTC)).get_next(datetime)
        except (CroniterBadCronError, CroniterBadDateError, ValueError, KeyError) as exc:
            msg = f"invalid cron expression {self.expression!r}: {exc}"
            raise ValueError(msg) from None

    @property
    def key(self) -> str:
        """What identifies the schedule: a changed key restarts its clock."""
        return f"{self.expression.strip()} {self.timezone}"

    def _iter(self, start: datetime) -> croniter:
        local = start.astimezone(ZoneInfo(self.timezone))
        seconds = len(self.expression.split()) == 6
        return croniter(self.expression, local, second_at_beginning=seconds)

    def next_after(self, moment: datetime) -> datetime:
        """The first fire time strictly after ``moment``."""
        return _utc(self._iter(moment).get_next(datetime))

    def latest_at(self, moment: datetime) -> datetime:
        """The last fire time at or before ``moment``."""
        return _utc(self._iter(moment + _TINY).get_prev(datetime))

    def previous_before(self, fire: datetime) -> datetime:
        """The fire time before ``fire``: where ``fire``'s data interval starts."""
        return _utc(self._iter(fire).get_prev(datetime))

    def interval(self, fire: datetime) -> Interval:
        """The data interval a run firing at ``fire`` covers."""
        return Interval(self.previous_before(fire), fire)

    def following(self, after: datetime) -> Iterator[datetime]:
        """Every fire time after ``after``, oldest first, without end: one croniter walked
        forward (far cheaper per fire than :meth:`next_after` from scratch)."""
        it = self._iter(after)
        while True:
            yield _utc(it.get_next(datetime))

    def fires(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """Every fire time in ``(after, until]``, oldest first."""
        it = self._iter(after)
        while (fire := _utc(it.get_next(datetime))) <= until:
            yield fire

    def latest_fires(self, after: datetime, until: datetime, limit: int) -> list[datetime]:
        """The newest ``limit`` fire times in ``(after, until]``, oldest first.

        Walks back from ``until``, so a schedule that missed a year of seconds costs
        ``limit`` steps, not a year's.
        """
        found: list[datetime] = []
        it = self._iter(until + _TINY)
        while len(found) < limit:
            fire = _utc(it.get_prev(datetime))
            if fire <= after:
                break
            found.append(fire)
        return found[::-1]


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)
