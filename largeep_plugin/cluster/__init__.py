"""An emulated multi-node cluster on one machine (network namespaces + tc), its launcher, and failure detection.

    EmulatedCluster   launcher.py   per-node namespaces, ranks started inside them, always torn down
    RankWatchdog      watchdog.py   heartbeats over a side store; a lost rank ends the others with its name
    netns.py                        the namespaces, bridge, veths and qdiscs themselves
    layer_worker.py                 a rank program that runs (and checks) the MoE layer, with fault injection
"""
from .launcher import ClusterResult, EmulatedCluster, RankResult
from .netns import ClusterUnavailable, parse_duration, parse_rate, remove_leftovers, unavailable_reason
from .watchdog import EXIT_RANK_LOST, RankLostError, RankWatchdog

__all__ = [
    "EXIT_RANK_LOST", "ClusterResult", "ClusterUnavailable", "EmulatedCluster", "RankLostError", "RankResult",
    "RankWatchdog", "parse_duration", "parse_rate", "remove_leftovers", "unavailable_reason",
]
