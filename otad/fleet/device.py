"""What the fleet client reads of the device: its type, the running release, the update phase.

The poller reads the device through a `DeviceView` only, so that it can be tested
without an engine; `engine_view` makes one from the real engine's snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from otad.engine import Engine
from otad.state import Outcome, Phase, SlotStatus

UNKNOWN_ARTIFACT = "unknown"  # the server requires a name; otad's converter always sets one


@dataclass(frozen=True)
class DeviceView:
    device_type: str
    artifact_name: str
    phase: Phase
    provides: Mapping[str, str] = field(default_factory=dict)
    last: Outcome | None = None
    # The artifact of the inactive slot when it is marked bad: it was installed, and its
    # trial failed or was rolled back (an install cut short leaves the slot empty).
    bad_artifact: str | None = None

    def device_provides(self) -> dict[str, str]:
        """The provides a deployments/next request sends: the release's, the type and name."""
        return {
            **self.provides,
            "device_type": self.device_type,
            "artifact_name": self.artifact_name,
        }


def engine_view(engine: Engine) -> DeviceView:
    """Read the engine's record and the booted slot's release."""
    snapshot = engine.snapshot()
    release = snapshot.state.slots[snapshot.booted].release
    inactive = snapshot.state.slots[snapshot.booted.other]
    bad = inactive.release if inactive.status is SlotStatus.BAD else None
    return DeviceView(
        device_type=engine.config.device_type,
        artifact_name=release.artifact if release else UNKNOWN_ARTIFACT,
        phase=snapshot.state.phase,
        provides=dict(release.provides) if release else {},
        last=snapshot.state.last,
        bad_artifact=bad.artifact if bad else None,
    )
