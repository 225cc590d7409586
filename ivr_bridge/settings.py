"""Service settings, read once from the environment (and an optional `.env` file)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

PROVIDERS = ("nextevi", "echo")
DEFAULT_NEXTEVI_URL = "wss://api.nextevi.com/ws/voice"
DEFAULT_PUBLIC_URL = "http://127.0.0.1:8080"


class SettingsError(ValueError):
    """A setting is missing or wrong; the message names the variable and is safe to print."""


@dataclass(frozen=True)
class Settings:
    public_url: str = DEFAULT_PUBLIC_URL
    provider: str = "echo"
    nextevi_url: str = DEFAULT_NEXTEVI_URL
    nextevi_api_key: str = ""
    nextevi_config_id: str = ""
    nextevi_project_id: str = ""
    upstream_chunk_ms: int = 100

    @property
    def stream_url(self) -> str:
        """The `wss://` (or `ws://`) Media Stream URL Twilio connects to."""
        scheme, rest = self.public_url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/media-stream"

    def __repr__(self) -> str:
        # Keeps the API key out of any log line or traceback that prints the settings.
        key = "***" if self.nextevi_api_key else "''"
        return (
            f"Settings(public_url={self.public_url!r}, provider={self.provider!r}, "
            f"nextevi_url={self.nextevi_url!r}, nextevi_api_key={key}, "
            f"nextevi_config_id={self.nextevi_config_id!r}, upstream_chunk_ms={self.upstream_chunk_ms})"
        )

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        dotenv: bool = True,
        default_public_url: str = DEFAULT_PUBLIC_URL,
    ) -> Settings:
        """Read and validate settings; raises SettingsError naming the first bad variable."""
        if env is None:
            env = dict(os.environ)
            if dotenv and Path(".env").is_file():
                from dotenv import dotenv_values

                # Real environment variables win over the file.
                env = {k: v for k, v in dotenv_values(".env").items() if v is not None} | env

        def get(name: str, default: str = "") -> str:
            return env.get(name, default).strip()

        public_url = get("IVR_PUBLIC_URL", default_public_url).rstrip("/")
        parts = urlsplit(public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SettingsError(f"IVR_PUBLIC_URL must be an http:// or https:// base URL, got {public_url!r}")
        if parts.query or parts.fragment:
            raise SettingsError("IVR_PUBLIC_URL must not carry a query string or fragment")

        api_key = get("NEXTEVI_API_KEY")
        provider = get("IVR_PROVIDER").lower() or ("nextevi" if api_key else "echo")
        if provider not in PROVIDERS:
            raise SettingsError(f"IVR_PROVIDER must be one of {', '.join(PROVIDERS)}, got {provider!r}")

        nextevi_url = get("NEXTEVI_URL", DEFAULT_NEXTEVI_URL).rstrip("/")
        if urlsplit(nextevi_url).scheme not in ("ws", "wss"):
            raise SettingsError(f"NEXTEVI_URL must be a ws:// or wss:// URL, got {nextevi_url!r}")
        config_id = get("NEXTEVI_CONFIG_ID")
        if provider == "nextevi":
            if not api_key:
                raise SettingsError("NEXTEVI_API_KEY is required when IVR_PROVIDER=nextevi")
            if not config_id:
                raise SettingsError("NEXTEVI_CONFIG_ID is required when IVR_PROVIDER=nextevi")

        raw_chunk = get("IVR_UPSTREAM_CHUNK_MS", "100")
        try:
            chunk_ms = int(raw_chunk)
        except ValueError:
            chunk_ms = 0
        # 20 ms is one Twilio frame; above 1000 ms replies lag; the API allows 100 msg/s.
        if not 20 <= chunk_ms <= 1000 or chunk_ms % 20:
            raise SettingsError(
                f"IVR_UPSTREAM_CHUNK_MS must be a multiple of 20 between 20 and 1000, got {raw_chunk!r}"
            )

        return cls(
            public_url=public_url,
            provider=provider,
            nextevi_url=nextevi_url,
            nextevi_api_key=api_key,
            nextevi_config_id=config_id,
            nextevi_project_id=get("NEXTEVI_PROJECT_ID"),
            upstream_chunk_ms=chunk_ms,
        )
