"""Local stand-ins for the providers' APIs, for tests, the demo and benchmarks, and the registry of
provider kits (simulators/kit.py): one per provider, each declared beside its simulator.

Each simulator serves one provider's documented paths, headers, status codes and JSON bodies over
real loopback HTTP, with injectable faults and a request log. Stdlib only, so the exporter's
dependencies never leak in.
"""

from simulators import betatel, d7, kaleyra, meta, whatsgate
from simulators.betatel import BetatelSimulator
from simulators.d7 import D7Simulator
from simulators.kaleyra import KaleyraSimulator
from simulators.kit import Kit
from simulators.meta import MetaSimulator
from simulators.server import Fault, RecordedRequest, Simulator
from simulators.whatsgate import WhatsGateSimulator

# the same keys, in the same order, as exporter.providers.PROVIDERS (tests/test_provider_kit.py)
KITS: dict[str, Kit] = {
    "whatsgate": whatsgate.KIT,
    "betatel": betatel.KIT,
    "d7": d7.KIT,
    "kaleyra": kaleyra.KIT,
    "meta": meta.KIT,
}

SIMULATORS: dict[str, type[Simulator]] = {name: kit.simulator for name, kit in KITS.items()}

__all__ = [
    "KITS",
    "SIMULATORS",
    "BetatelSimulator",
    "D7Simulator",
    "Fault",
    "KaleyraSimulator",
    "Kit",
    "MetaSimulator",
    "RecordedRequest",
    "Simulator",
    "WhatsGateSimulator",
]
