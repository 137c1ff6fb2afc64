"""An emulated multi-node cluster on one machine (network namespaces + tc), its launcher, and failure detection.

    EmulatedCluster   launcher.py   per-node namespaces, ranks started inside them, always torn down; NodeKill
                                    loses a node mid-run
    run_and_relaunch  recovery.py   a run that loses a node, the relaunch on the survivors, the recovery timeline
    RankWatchdog      watchdog.py   heartbeats over a side store; a lost rank ends the others with its name
    netns.py                        the namespaces, bridge, veths and qdiscs themselves
    layer_worker.py                 a rank program that runs (and checks) the MoE layer, with fault injection
    train_worker.py                 a rank program that trains with checkpoints and resumes (the lost-node drill)
"""
from .launcher import ClusterResult, EmulatedCluster, NodeKill, RankResult
from .recovery import Recovery, run_and_relaunch
from .netns import ClusterUnavailable, parse_duration, parse_rate, remove_leftovers, unavailable_reason
from .watchdog import EXIT_RANK_LOST, RankLostError, RankWatchdog

__all__ = [
    "EXIT_RANK_LOST", "ClusterResult", "ClusterUnavailable", "EmulatedCluster", "NodeKill", "RankLostError",
    "RankResult", "RankWatchdog", "Recovery", "parse_duration", "parse_rate", "remove_leftovers", "run_and_relaunch",
    "unavailable_reason",
]
