"""The finished runs of a per-run file (``RESULTS/NAME_runs.csv``), found by their configurations: what
``--from_records`` rebuilds a study's tables from, with no run folder.

Where the data is not on this machine (a configuration with no fingerprint), a configuration is matched
with each fingerprint the records carry; where it is, that fingerprint must be the data's."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.config import ConfigError, RunConfig
from bench.report import records


class Recorded:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.by_id = {r["run_id"]: r for r in records.read(self.path) if r["status"] != "unfinished"}
        except records.RecordsError as err:
            raise ConfigError(str(err)) from None
        self.data_ids = {(r.get("settings") or {}).get("data_id") for r in self.by_id.values()}

    def find(self, config: RunConfig) -> dict[str, Any] | None:
        """The record of ``config``'s run, or None."""
        candidates = [config] if config.data_id is not None else [replace(config, data_id=d) for d in self.data_ids]
        return next((self.by_id[c.run_id()] for c in candidates if c.run_id() in self.by_id), None)
