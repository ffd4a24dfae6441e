"""Local stand-ins for the providers' APIs, for tests, the demo and benchmarks.

Each simulator serves one provider's documented paths, headers, status codes and JSON bodies over
real loopback HTTP, with injectable faults and a request log. Stdlib only, so the exporter's
dependencies never leak in.
"""

from simulators.betatel import BetatelSimulator
from simulators.d7 import D7Simulator
from simulators.kaleyra import KaleyraSimulator
from simulators.server import Fault, RecordedRequest, Simulator
from simulators.whatsgate import WhatsGateSimulator

SIMULATORS: dict[str, type[Simulator]] = {
    "whatsgate": WhatsGateSimulator,
    "betatel": BetatelSimulator,
    "d7": D7Simulator,
    "kaleyra": KaleyraSimulator,
}

__all__ = [
    "SIMULATORS",
    "BetatelSimulator",
    "D7Simulator",
    "Fault",
    "KaleyraSimulator",
    "RecordedRequest",
    "Simulator",
    "WhatsGateSimulator",
]
