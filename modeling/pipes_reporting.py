"""How the training process reports back: through Dagster Pipes when an orchestrator launched it, to
stdout otherwise.

The child needs only the small `dagster-pipes` package (imported only when the launching process set up
a Pipes context), never `dagster` itself. Under `accelerate launch` every process runs the same script;
only the main process (RANK 0) opens the Pipes channel and reports, the others just log to stdout.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PIPES_ENV = "DAGSTER_PIPES_CONTEXT"
"""Set by Dagster's Pipes clients in the child's environment."""


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class Reporter:
    """log(text) and done(results) for the training process."""

    def __init__(self, pipes: Any | None) -> None:
        self.pipes = pipes

    def log(self, message: str) -> None:
        if self.pipes is not None:
            self.pipes.log.info(message)
        print(message, file=sys.stderr, flush=True)

    def done(self, results: dict[str, Any]) -> None:
        """Report the final numbers: asset metadata under Pipes, a JSON line on stdout otherwise."""
        if self.pipes is not None:
            self.pipes.report_asset_materialization(metadata=_pipes_metadata(results))
        print("RESULT " + json.dumps(results, default=str), flush=True)


def _pipes_metadata(results: dict[str, Any]) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for key, value in results.items():
        if isinstance(value, bool):
            metadata[key] = {"raw_value": value, "type": "bool"}
        elif isinstance(value, int):
            metadata[key] = {"raw_value": value, "type": "int"}
        elif isinstance(value, float):
            metadata[key] = {"raw_value": value, "type": "float"}
        elif isinstance(value, str):
            metadata[key] = {"raw_value": value, "type": "md" if "\n" in value else "text"}
        else:
            metadata[key] = {"raw_value": json.loads(json.dumps(value, default=str)), "type": "json"}
    return metadata


@contextmanager
def child_reporter() -> Iterator[Reporter]:
    if PIPES_ENV in os.environ and is_main_rank():
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            yield Reporter(pipes)
    else:
        yield Reporter(None)
