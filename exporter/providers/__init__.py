"""The provider registry: the config's allowed provider keys are exactly this dict's keys."""

from exporter.providers import betatel, d7, kaleyra, meta, whatsgate
from exporter.providers.base import Provider

PROVIDERS: dict[str, Provider] = {
    "whatsgate": whatsgate.PROVIDER,
    "betatel": betatel.PROVIDER,
    "d7": d7.PROVIDER,
    "kaleyra": kaleyra.PROVIDER,
    "meta": meta.PROVIDER,
}

ACCOUNT_MODELS = {name: provider.account_model for name, provider in PROVIDERS.items()}
