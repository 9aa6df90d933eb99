"""A real ``fedcare node`` process that kills itself with SIGKILL at one secure aggregation phase.

Usage: ``python node_that_dies.py PHASE before|after node --config ... --coordinator ... --certs ...``

``before``: the node receives the phase's job and dies without answering it;
``after``: it answers, then dies. Everything else is the ``fedcare node`` command.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from fedcare import deployment
from fedcare.federation.node import Node
from fedcare.messages import JobKind

class DyingNode(Node):
    def serve(self, channel: Any, *, poll_s: float = 0.5) -> None:
        while not channel.closed:
            job = channel.pull_job(timeout_s=poll_s)
            if job is None:
                continue
            hit = job.kind is JobKind.SECAGG and job.config.get("secagg_phase") == PHASE
            if hit and WHEN == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            channel.push_result(self.handle(job))
            if hit and WHEN == "after":
                os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    PHASE, WHEN = sys.argv[1], sys.argv[2]
    deployment.Node = DyingNode  # type: ignore[misc]
    sys.argv = ["fedcare", *sys.argv[3:]]

    from fedcare.cli import main

    main()
