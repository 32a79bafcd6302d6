"""Number profiles stored in Redis per E.164 number; the ``DEFAULT_*`` settings profile every other number."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

import redis

from app.config import KALLGLOT_MODES, LANGUAGE_CODE
from app.redis_keys import RedisKeys

E164 = re.compile(r"^\+[1-9]\d{6,14}$")


class ProfileError(ValueError):
    """A profile value is invalid; ``problems`` lists each one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class NumberProfile:
    """How calls to one number are put on Kallglot (more fields arrive with the admin and lifecycle issues)."""

    mode: str = "bidirectional_translation"
    source_language: str = ""
    target_language: str = ""
    #: Whether this profile belongs to the number itself (False: the DEFAULT_* profile applied).
    own: bool = False

    def problems(self) -> list[str]:
        """Every invalid value, one sentence each."""
        found = []
        if self.mode not in KALLGLOT_MODES:
            found.append(f"mode must be one of {', '.join(KALLGLOT_MODES)}, got {self.mode!r}")
        for name in ("source_language", "target_language"):
            value = getattr(self, name)
            if value and not LANGUAGE_CODE.match(value):
                found.append(f"{name} must be a language code like 'en' or 'es', got {value!r}")
        return found

    def to_json(self) -> str:
        """Serialized form stored in Redis (without ``own``, which is implied by where it is stored)."""
        data = asdict(self)
        data.pop("own")
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> NumberProfile:
        """Parse a stored profile, ignoring fields this version does not know."""
        data: dict[str, Any] = json.loads(raw)
        known = {k: str(v) for k, v in data.items() if k in ("mode", "source_language", "target_language")}
        return cls(**known, own=True)


class ProfileStore:
    """Reads and writes number profiles; any number without its own gets ``default``."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, default: NumberProfile) -> None:
        self._redis = client
        self._keys = keys
        self.default = default

    def for_number(self, number: str) -> NumberProfile:
        """The profile that applies to calls to ``number`` (its own, else the default)."""
        raw = self._redis.get(self._keys.profile(number)) if number else None
        return NumberProfile.from_json(raw) if raw else self.default

    def set(self, number: str, profile: NumberProfile) -> NumberProfile:
        """Validate and store ``profile`` as ``number``'s own; raises :class:`ProfileError`."""
        problems = profile.problems()
        if not E164.match(number or ""):
            problems.insert(0, f"number must be in E.164 form like +14155551234, got {number!r}")
        if problems:
            raise ProfileError(problems)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._keys.profile(number), profile.to_json())
            pipe.sadd(self._keys.profiles_index(), number)
            pipe.execute()
        return replace(profile, own=True)

    def delete(self, number: str) -> bool:
        """Remove ``number``'s own profile (it falls back to the default); True if there was one."""
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._keys.profile(number))
            pipe.srem(self._keys.profiles_index(), number)
            removed, _ = pipe.execute()
        return bool(removed)

    def all(self) -> dict[str, NumberProfile]:
        """Every number with its own profile, sorted by number."""
        numbers = sorted(n.decode() if isinstance(n, bytes) else n
                         for n in self._redis.smembers(self._keys.profiles_index()))
        return {n: p for n in numbers if (p := self.for_number(n)).own}
