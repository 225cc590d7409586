"""Settings: defaults, validation, and secrets kept out of reprs."""

import pytest

from ivr_bridge.settings import Settings, SettingsError


def test_defaults_need_no_credentials() -> None:
    s = Settings.from_env({})
    assert s.provider == "local"  # the offline IVR: no key, no network
    assert s.stream_url == "ws://127.0.0.1:8080/media-stream"
    assert s.upstream_chunk_ms == 0  # the provider's own


def test_https_public_url_gives_wss_stream() -> None:
    s = Settings.from_env({"IVR_PUBLIC_URL": "https://abc.example.com/"})
    assert s.stream_url == "wss://abc.example.com/media-stream"


def test_nextevi_key_selects_nextevi() -> None:
    s = Settings.from_env({"NEXTEVI_API_KEY": "oak_secret", "NEXTEVI_CONFIG_ID": "cfg"})
    assert s.provider == "nextevi"
    assert "oak_secret" not in repr(s)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"IVR_PUBLIC_URL": "abc.example.com"}, "IVR_PUBLIC_URL"),
        ({"IVR_PUBLIC_URL": "https://x.com/?a=1"}, "IVR_PUBLIC_URL"),
        ({"IVR_PROVIDER": "bogus"}, "IVR_PROVIDER"),
        ({"IVR_PROVIDER": "nextevi", "NEXTEVI_CONFIG_ID": "c"}, "NEXTEVI_API_KEY"),
        ({"IVR_PROVIDER": "nextevi", "NEXTEVI_API_KEY": "k"}, "NEXTEVI_CONFIG_ID"),
        ({"NEXTEVI_URL": "https://api.nextevi.com"}, "NEXTEVI_URL"),
        ({"IVR_UPSTREAM_CHUNK_MS": "abc"}, "IVR_UPSTREAM_CHUNK_MS"),
        ({"IVR_UPSTREAM_CHUNK_MS": "30"}, "IVR_UPSTREAM_CHUNK_MS"),
        ({"IVR_UPSTREAM_CHUNK_MS": "5000"}, "IVR_UPSTREAM_CHUNK_MS"),
    ],
)
def test_wrong_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


def test_auth_token_is_secret_and_leaves_development_mode() -> None:
    s = Settings.from_env({"TWILIO_AUTH_TOKEN": "tok_secret_123"})
    assert not s.development_mode
    assert "tok_secret_123" not in repr(s)
    assert Settings.from_env({}).development_mode


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"IVR_MAX_CALLS": "0"}, "IVR_MAX_CALLS"),
        ({"IVR_IDLE_TIMEOUT_S": "soon"}, "IVR_IDLE_TIMEOUT_S"),
        ({"IVR_RECONNECT_BUDGET_S": "nan"}, "IVR_RECONNECT_BUDGET_S"),
        ({"IVR_FALLBACK_NUMBER": "call bob"}, "IVR_FALLBACK_NUMBER"),
        ({"IVR_FALLBACK_TWIML_URL": "ftp://x"}, "IVR_FALLBACK_TWIML_URL"),
        ({"IVR_TWILIO_API_URL": "api.twilio.com"}, "IVR_TWILIO_API_URL"),
    ],
)
def test_wrong_resilience_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


def test_routing_settings() -> None:
    s = Settings.from_env(
        {
            "IVR_HOOK_URL": "https://crm.example.com/ivr, http://127.0.0.1:8090/",
            "IVR_HOOK_SECRET": "hook_secret_123",
            "IVR_DTMF_MAP": "0=transfer:+15550100, 9=hangup, #=transfer:sip:desk@pbx.example.com",
            "IVR_API_TOKEN": "api_secret_123",
            "IVR_DATABASE_URL": "postgresql://ivr:db_secret_123@db.example.com/calls",
        }
    )
    assert s.hook_urls == ("https://crm.example.com/ivr", "http://127.0.0.1:8090/")
    assert s.dtmf_actions == {
        "0": "transfer:+15550100",
        "9": "hangup",
        "#": "transfer:sip:desk@pbx.example.com",
    }
    assert s.database == "postgresql+asyncpg://ivr:db_secret_123@db.example.com/calls"
    for secret in ("hook_secret_123", "api_secret_123", "db_secret_123"):
        assert secret not in repr(s)
    defaults = Settings.from_env({})
    assert defaults.database == "sqlite+aiosqlite:///ivr-bridge.db" and defaults.instance_id
    assert defaults.api_token == "" and defaults.hook_urls == () and defaults.dtmf_map == ()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"IVR_HOOK_URL": "crm.example.com/ivr", "IVR_HOOK_SECRET": "s"}, "IVR_HOOK_URL"),
        ({"IVR_HOOK_URL": "https://crm.example.com/ivr"}, "IVR_HOOK_SECRET"),
        ({"IVR_HOOK_RETRIES": "-1"}, "IVR_HOOK_RETRIES"),
        ({"IVR_DTMF_MAP": "x=hangup"}, "IVR_DTMF_MAP"),
        ({"IVR_DTMF_MAP": "1=transfer:5550100"}, "IVR_DTMF_MAP"),
        ({"IVR_DTMF_MAP": "1=hangup,1=transfer:+15550100"}, "IVR_DTMF_MAP"),
        ({"IVR_DTMF_MAP": "1=dance"}, "IVR_DTMF_MAP"),
        ({"IVR_PLAYOUT_WAIT_S": "forever"}, "IVR_PLAYOUT_WAIT_S"),
        ({"IVR_DATABASE_URL": "mysql://db/calls"}, "IVR_DATABASE_URL"),
    ],
)
def test_wrong_routing_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


def _variables(provider) -> dict[str, object]:
    from dataclasses import fields

    return {f.metadata["variable"].env: f.metadata["variable"] for f in fields(provider.settings)}


def test_each_provider_s_own_settings_come_from_its_module() -> None:
    """The registry is the one place a provider's variables are declared: each is read,
    its credential alone selects it, its required variables are named when missing, and its
    secrets stay out of the repr, the summary line and nowhere else."""
    from ivr_bridge.providers import registry

    names = Settings.variable_names()
    for name, provider in registry().items():
        if provider.settings is None:
            continue
        variables = _variables(provider)
        assert set(variables) <= names and (provider.credential in variables or not provider.credential)
        required = {env: "x" for env, var in variables.items() if var.required}
        if not provider.credential:  # chosen by name only (the embedded `local`)
            required["IVR_PROVIDER"] = name
        rules = {"NAVTALK_CHARACTER": "Sophia"} if name == "navtalk" else {}  # the module's own rule
        secrets = {env: f"secret-{env.lower()}" for env, var in variables.items() if var.secret}
        settings = Settings.from_env(required | rules | secrets)
        assert settings.provider == name and type(settings.voice) is provider.settings
        for value in secrets.values():
            assert value in settings.secret_values()
            assert value not in repr(settings) and value not in settings.summary()
        for env in required:
            if env != provider.credential and env in variables:
                with pytest.raises(SettingsError, match=f"{env} is required when IVR_PROVIDER={name}"):
                    Settings.from_env({k: v for k, v in (required | rules).items() if k != env})


def test_two_providers_configured_need_ivr_provider_to_choose() -> None:
    both = {"OPENAI_API_KEY": "sk", "ELEVENLABS_AGENT_ID": "agent"}
    with pytest.raises(SettingsError, match=r"IVR_PROVIDER must say .*: ELEVENLABS_AGENT_ID and OPENAI_API"):
        Settings.from_env(both)
    assert Settings.from_env(both | {"IVR_PROVIDER": "openai"}).voice.api_key == "sk"


def test_navtalk_needs_a_character_or_an_avatar_and_instructions_may_come_from_a_file(tmp_path) -> None:
    with pytest.raises(SettingsError, match="NAVTALK_CHARACTER or NAVTALK_AVATAR_ID"):
        Settings.from_env({"NAVTALK_LICENSE": "nt"})
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("You answer for Acme.\n", encoding="utf-8")
    s = Settings.from_env({"OPENAI_API_KEY": "sk", "OPENAI_REALTIME_INSTRUCTIONS": f"@{prompt}"})
    assert s.voice.instructions == "You answer for Acme."
    with pytest.raises(SettingsError, match="OPENAI_REALTIME_INSTRUCTIONS: cannot read"):
        Settings.from_env({"OPENAI_API_KEY": "sk", "OPENAI_REALTIME_INSTRUCTIONS": "@/nonexistent/x"})


def test_each_provider_has_its_own_session_cap_unless_one_is_set() -> None:
    """NextEVI and OpenAI cap a session at 60 minutes, so the bridge renews before; an
    ElevenLabs agent or NavTalk ends a conversation itself, and a renewal would start a new
    one (a second greeting), so theirs are never renewed unless IVR_MAX_SESSION_S says so."""
    from ivr_bridge.providers import session_cap

    openai = Settings.from_env({"OPENAI_API_KEY": "sk"})
    agent = Settings.from_env({"ELEVENLABS_AGENT_ID": "agent"})
    assert (session_cap(openai), session_cap(agent), session_cap(Settings())) == (3600, None, None)
    capped = Settings.from_env({"ELEVENLABS_AGENT_ID": "agent", "IVR_MAX_SESSION_S": "1800"})
    assert session_cap(capped) == 1800
    with pytest.raises(SettingsError, match="IVR_MAX_SESSION_S"):
        Settings.from_env({"IVR_MAX_SESSION_S": "30"})


def test_each_provider_takes_caller_audio_in_its_own_message_size_unless_one_is_set() -> None:
    from ivr_bridge.providers import upstream_chunk_ms

    assert upstream_chunk_ms(Settings.from_env({"OPENAI_API_KEY": "sk"})) == 20
    assert upstream_chunk_ms(Settings.from_env({"NEXTEVI_API_KEY": "k", "NEXTEVI_CONFIG_ID": "c"})) == 100
    chosen = {"OPENAI_API_KEY": "sk", "IVR_UPSTREAM_CHUNK_MS": "200"}
    assert upstream_chunk_ms(Settings.from_env(chosen)) == 200
