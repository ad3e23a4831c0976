"""What a benchmark run measures and how big: the full run, `--quick`, and the tests' smoke."""

from __future__ import annotations

from dataclasses import dataclass, replace

FIGURES = ("claim", "depth", "upload", "reload", "footprint", "simulate", "postgres")


@dataclass(frozen=True)
class Options:
    runs: int = 5  #: each figure is the median of this many runs (min–max shown)
    claim_jobs: int = 10_000  #: jobs pre-loaded for each claim-cycle run
    claim_seconds: float = 3.0  #: a claim-cycle run stops after this long (0: when drained)
    claim_workers: tuple[int, ...] = (1, 4, 16, 64)
    depths: tuple[int, ...] = (100, 10_000, 100_000)
    depth_claims: int = 200  #: timed claims per run and depth
    upload_mib: int = 512
    reload_sizes: tuple[int, ...] = (1_000, 10_000, 100_000)
    load_sizes: tuple[int, ...] = (1_000, 10_000)  #: manifests also parsed from TOML
    idle_window_s: float = 10.0  #: one idle-worker measurement window
    busy_window_s: float = 3.0  #: one heartbeating-worker measurement window
    heartbeat_interval_s: float = 2.0  #: the heartbeating worker's --heartbeat-interval
    sim_jobs: int = 200  #: jobs in the simulated lab (one seed per run)
    pg_workers: tuple[int, ...] = (1, 4, 16)  #: W of the PostgreSQL claim cycle (figure 7)
    http: str = "auto"  #: uvicorn --http for every server: auto, h11 or httptools
    loop: str = "auto"  #: uvicorn --loop: auto, asyncio or uvloop
    synchronous: str = "FULL"  #: SQLite synchronous; anything but FULL is a what-if
    figures: tuple[str, ...] = FIGURES

    @property
    def what_if(self) -> bool:
        return self.synchronous.upper() != "FULL"


QUICK = Options(
    runs=3, claim_jobs=3_000, claim_seconds=1.5, claim_workers=(1, 16, 64),
    depths=(100, 10_000), depth_claims=100, upload_mib=64, reload_sizes=(1_000, 10_000),
    load_sizes=(1_000,), idle_window_s=3.0, busy_window_s=1.5, pg_workers=(1, 16),
)

SMOKE = Options(
    runs=1, claim_jobs=50, claim_seconds=0.0, claim_workers=(2,), depths=(100, 200),
    depth_claims=10, upload_mib=1, reload_sizes=(200,), load_sizes=(200,),
    idle_window_s=0.5, busy_window_s=0.5, heartbeat_interval_s=0.5, sim_jobs=40,
    pg_workers=(2,),
)


def with_(options: Options, **changes: object) -> Options:
    return replace(options, **changes)  # type: ignore[arg-type]
