"""A job's defaults and bounds: the one home of them. The engine's spec and submission check, the CLI, the
job model and its input, the API's serializers and the page's form all read them from here, so that a bound
changed here changes what each of them offers and accepts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bound:
    """An integer a request may set: its default (None: unset) and the least and most accepted."""

    default: int | None
    least: int
    most: int

    def field_bounds(self) -> dict[str, int]:
        """min_value and max_value, as a DRF serializer's field and a Django form's field both take them."""
        return {"min_value": self.least, "max_value": self.most}


# Calibration: how many samples, of how many tokens each (32 x 256 calibrates a 1 B model in minutes).
CALIBRATION_SAMPLES = Bound(default=32, least=1, most=4096)
CALIBRATION_MAX_SEQ_LEN = Bound(default=256, least=8, most=32768)
CALIBRATION_SPLIT = "train"  # a hub dataset's split and column when none is named
CALIBRATION_COLUMN = "text"

# lm-eval: examples per task (None: the whole task).
EVALUATION_LIMIT = Bound(default=None, least=1, most=1_000_000)

# A floor search or a sweep: trials (each a compression and a held-out measurement).
SEARCH_MAX_TRIALS = Bound(default=6, least=1, most=50)

# A job's priority: 9 runs first (the broker's priority is the reverse: jobs.services.broker.broker_priority).
PRIORITY = Bound(default=5, least=0, most=9)
