"""What a sandbox is started with, and the agent settings that talk to it.

The credentials are fixed, well-known values rather than random ones: an installer's dry run and a developer's
config can be written once and reused across sandbox restarts, and nothing real is ever behind them. They match
`provisioning/agent.example.toml` where that file names an id, so the example needs only its URLs changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .faults import FaultRule

ZIGGY_PREFIX = "/ziggy/api/v1"
DEFAULT_PORT = 8900
DEFAULT_MEMBERS = 1000
DEFAULT_SEED = 1
DEFAULT_TOKEN_TTL_S = 300.0  # Keycloak's default access-token lifespan
DEFAULT_IDEMPOTENCY_TTL_S = 86_400.0  # Ziggy forgets keys after a day (DESIGN 2.2)
SIGNATURE_WINDOW_S = 300.0
MAX_EVENTS_PER_BATCH = 500
MAX_MEMBERS = 1_000_000
# A 30 s highlight at 720p and 2 Mbit/s is about 7.5 MB (DESIGN 5); the cap leaves room for longer or sharper clips.
DEFAULT_CLIP_MAX_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SandboxOptions:
    members: int = DEFAULT_MEMBERS
    seed: int = DEFAULT_SEED
    token_ttl_s: float = DEFAULT_TOKEN_TTL_S
    idempotency_ttl_s: float = DEFAULT_IDEMPOTENCY_TTL_S
    signature_window_s: float = SIGNATURE_WINDOW_S
    faults: tuple[FaultRule, ...] = ()
    fault_seed: int | None = None  # the fault plan's own RNG seed; `seed` when not given
    realm: str = "club"
    cloud_client_id: str = "edge-01"
    cloud_client_secret: str = "sandbox-cloud-client-secret"  # noqa: S105 - a published sandbox value
    signing_secret: str = "sandbox-cloud-signing-secret"  # noqa: S105
    ziggy_api_key: str = "sandbox-ziggy-api-key"
    ziggy_client_id: str = "club-001-edge"
    # Ziggy knows its courts by name; any other court id is accepted and named after its id.
    courts: Mapping[str, str] = field(default_factory=dict)
    # Where received clips are written (one folder per reset); None: a temporary folder removed with the sandbox.
    clips_dir: Path | None = None
    clip_max_bytes: int = DEFAULT_CLIP_MAX_BYTES
    # Device claim (POST /edge/claim): the one-time tokens valid at start, and what a claim hands out.
    claim_tokens: tuple[str, ...] = ("sandbox-claim-0001", "sandbox-claim-0002")
    club_id: str = "club-001"
    site_name: str = "Arena Sandbox"

    def __post_init__(self) -> None:
        if not 0 <= self.members <= MAX_MEMBERS:
            raise ValueError(f"members must be 0..{MAX_MEMBERS}")
        for name in ("token_ttl_s", "idempotency_ttl_s", "signature_window_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.clip_max_bytes <= 0:
            raise ValueError("clip_max_bytes must be positive")


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """The values an agent needs to use a sandbox at `base_url`, as config and secrets TOML."""

    ziggy_base_url: str
    ziggy_client_id: str
    ziggy_api_key: str
    cloud_base_url: str
    token_url: str
    realm: str
    cloud_client_id: str
    cloud_client_secret: str
    signing_secret: str

    @classmethod
    def of(cls, options: SandboxOptions, base_url: str) -> AgentSettings:
        base = base_url.rstrip("/")
        return cls(
            ziggy_base_url=base + ZIGGY_PREFIX,
            ziggy_client_id=options.ziggy_client_id,
            ziggy_api_key=options.ziggy_api_key,
            cloud_base_url=base,
            token_url=f"{base}/realms/{options.realm}/protocol/openid-connect/token",
            realm=options.realm,
            cloud_client_id=options.cloud_client_id,
            cloud_client_secret=options.cloud_client_secret,
            signing_secret=options.signing_secret,
        )

    def config_toml(self) -> str:
        return (
            "[ziggy]\n"
            f'base_url = "{self.ziggy_base_url}"\n'
            f'client_id = "{self.ziggy_client_id}"\n'
            "\n"
            "[cloud]\n"
            f'base_url = "{self.cloud_base_url}"\n'
            f'token_url = "{self.token_url}"\n'
            f'client_id = "{self.cloud_client_id}"\n'
        )

    def secrets_toml(self) -> str:
        return (
            f'ziggy_api_key = "{self.ziggy_api_key}"\n'
            f'cloud_client_secret = "{self.cloud_client_secret}"\n'
            f'cloud_signing_secret = "{self.signing_secret}"\n'
        )
