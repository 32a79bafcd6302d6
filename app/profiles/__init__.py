"""Number profiles: which Kallglot mode and languages a called number gets."""
from app.profiles.store import E164, NumberProfile, ProfileError, ProfileStore

__all__ = ["E164", "NumberProfile", "ProfileError", "ProfileStore"]
