"""Number profiles: which Kallglot mode and languages a called number gets."""
from app.profiles.store import (
    E164, TRANSPORT_DIRECT, TRANSPORT_RELAY, TRANSPORT_SIP, TRANSPORTS, NumberProfile, ProfileError, ProfileStore,
)

__all__ = ["E164", "TRANSPORTS", "TRANSPORT_DIRECT", "TRANSPORT_RELAY", "TRANSPORT_SIP", "NumberProfile", "ProfileError",
           "ProfileStore"]
