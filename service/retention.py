"""The retention settings, declared like every other (service/settings.py), joined to
ServerSettings as one group:

    --retention-days        PRIVSCORE_RETENTION_DAYS        how long a subject's personal data
                                                            in the audit log stays readable
    --retention-interval-s  PRIVSCORE_RETENTION_INTERVAL_S  how often expiry runs

Expiry destroys the subject keys of every calendar month that ended more than the retention
period ago (service/api/privacy.py `expire`): those records' decisions stay in the log, which
still verifies, and no one can read whom they were about. SECURITY.md says what is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.settings import integer, number, setting


@dataclass(frozen=True)
class RetentionSettings:
    retention_days: int = setting(
        "--retention-days",
        "days a subject's personal data in the audit log stays readable: the subject keys of "
        "each month are destroyed once the month is this much in the past (credit records are "
        "commonly kept five years after the decision)",
        integer(1, 36_500),
        "1826",
        value=1826,
    )
    retention_interval_s: float = setting(
        "--retention-interval-s",
        "seconds between retention expiry runs (the first runs at start-up)",
        number(1.0, 7 * 86_400.0),
        "3600",
        value=3600.0,
    )
