"""Three instances as one service, as deployed: `ivr-bridge serve` processes behind a real
HAProxy (health-checking /readyz), records in PostgreSQL and the fabric in Redis, both the
local servers. Calls spread across instances; a transfer asked of an instance that does
not carry the call waits for the bot's sentence on the one that does and is on record;
an instance SIGTERMed mid-call drains while new calls go to the others; an instance
SIGKILLed mid-call has its call marked `interrupted` by a survivor; a spent token opens
nothing on another instance.

HAProxy comes from Debian's packages; `scripts/test` installs it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ivr_bridge.loadgen.webhook import CallDetails, fetch_stream
from ivr_bridge.standins.nextevi import VoiceApiBehaviour
from ivr_bridge.standins.twilio import TwilioCaller
from tests.support import eventually, stream_caller
from tests.test_end_to_end import API_KEY, CONFIG_ID, tone_ulaw, voice_api
from tests.test_fabric import REDIS_URL
from tests.test_hostile_state import free_port, serving
from tests.test_records import PG_DATABASE, PG_HOST, PG_PORT
from tests.test_routing import AGENT, API_TOKEN, record_of

HAPROXY_CONFIG = """
global
    maxconn 2000
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
listen stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
frontend ivr
    bind 127.0.0.1:{port}
    default_backend bridges
backend bridges
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 200ms fall 1 rise 2
{servers}
"""


@dataclass
class Instance:
    name: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def database() -> AsyncIterator[str]:
    import asyncpg

    admin = await asyncpg.connect(host=PG_HOST, port=PG_PORT, database=PG_DATABASE, timeout=5)
    name = f"ivr_fleet_{secrets.token_hex(4)}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{PG_HOST}:{PG_PORT}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_three_instances_behind_a_load_balancer_act_as_one(
    database: str, twilio_rest, tmp_path: Path
) -> None:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(haproxy).exists():
        pytest.fail(
            "haproxy is not installed: scripts/test installs it (apt-get install haproxy)", pytrace=False
        )
    rest, rest_url = twilio_rest
    lb_port, stats_port = free_port(), free_port()
    lb = f"http://127.0.0.1:{lb_port}"
    async with voice_api(VoiceApiBehaviour(reply_ms=1500)) as standin:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IVR_", "NEXTEVI_", "TWILIO_"))} | {
            "IVR_PUBLIC_URL": lb,  # Twilio signs the address it reaches: the load balancer's
            "TWILIO_AUTH_TOKEN": rest.auth_token,
            "TWILIO_ACCOUNT_SID": rest.account_sid,
            "IVR_TWILIO_API_URL": rest_url,
            "NEXTEVI_URL": standin.url,
            "NEXTEVI_API_KEY": API_KEY,
            "NEXTEVI_CONFIG_ID": CONFIG_ID,
            "IVR_REDIS_URL": REDIS_URL,
            "IVR_DATABASE_URL": database,
            "IVR_API_TOKEN": API_TOKEN,
            "IVR_HEARTBEAT_S": "0.5",
            "IVR_DRAIN_TIMEOUT_S": "30",
        }
        instances: list[Instance] = []
        for n in range(3):
            port = free_port()
            name = f"fleet{n}-{secrets.token_hex(2)}"
            log = (tmp_path / f"{name}.log").open("wb")
            process = subprocess.Popen(
                [sys.executable, "-m", "ivr_bridge", "serve", "--port", str(port)],
                env=env | {"IVR_INSTANCE_ID": name},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            instances.append(Instance(name, port, process))
        servers = "\n".join(f"    server {i.name} 127.0.0.1:{i.port} check" for i in instances)
        config = tmp_path / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(port=lb_port, stats_port=stats_port, servers=servers))
        balancer = subprocess.Popen(
            [haproxy, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            for instance in instances:
                await serving(instance.port)
            await serving(lb_port)
            await eventually(
                lambda: _all_up(stats_port, len(instances)), 15, "HAProxy sees every instance up"
            )

            async def place() -> tuple[CallDetails, TwilioCaller]:
                call = CallDetails()
                target = await fetch_stream(lb + "/twiml", call, rest.auth_token)
                rest.live_calls.add(call.call_sid)
                caller = stream_caller(target, call.call_sid, rest.auth_token)
                await caller.connect()
                return call, caller

            async def talk(caller: TwilioCaller) -> None:
                before = caller.received_total
                await caller.say(tone_ulaw(400))
                await caller.wait_for(lambda: caller.received_total >= before + 8 * 400, 20)

            async def owner(call_sid: str) -> str:
                async with httpx.AsyncClient(
                    headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10
                ) as c:
                    alive = next(i for i in instances if i.process.poll() is None)  # any of them
                    listed = (await c.get(alive.url + "/calls")).json()["calls"]
                return next(entry["instance"] for entry in listed if entry["call_sid"] == call_sid)

            # 1. Calls spread across the instances; GET /calls on one lists them all.
            placed = [await place() for _ in range(6)]
            await asyncio.gather(*(talk(caller) for _, caller in placed))
            owners = {await owner(call.call_sid) for call, _ in placed}
            assert len(owners) >= 2, owners

            # 2. A transfer asked of an instance that does not carry the call.
            call, caller = placed[0]
            carrier = await owner(call.call_sid)
            other = next(i for i in instances if i.name != carrier)
            await caller.say(tone_ulaw(400))
            await caller.wait_for(lambda: caller.playing, 20)
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=60) as c:
                answer = await c.post(f"{other.url}/calls/{call.call_sid}/transfer", json={"to": AGENT})
            assert answer.status_code == 200 and answer.json()["played_out"] is True, answer.text
            [update] = [u for u in rest.updates if u.call_sid == call.call_sid]
            assert update.at >= caller.marks_played_at[-1]
            for _, c in placed:
                await c.hang_up()
            database_settings = _settings(database)
            record = await record_of(database_settings, call.call_sid, "transferred")
            [control] = [e for e in record["events"] if e["type"] == "control"]
            assert record["instance_id"] == carrier and control["data"]["to"] == AGENT

            # 3. A spent token opens nothing on another instance.
            spent = CallDetails()
            target = await fetch_stream(lb + "/twiml", spent, rest.auth_token)
            first, second = instances[0], instances[1]
            for instance, expected in ((first, None), (second, 1008)):
                direct = f"ws://127.0.0.1:{instance.port}/media-stream"  # straight to the instance
                stream = stream_caller(target, spent.call_sid, rest.auth_token, url=direct)
                async with stream:
                    if expected is None:
                        await talk(stream)
                        await stream.hang_up()
                    else:
                        await stream.wait_closed(15)
                        assert stream.close_code == expected

            # 4. One instance SIGTERMed mid-call drains; new calls go to the others.
            draining_call, draining_caller = await place()
            await talk(draining_caller)
            carrier = await owner(draining_call.call_sid)
            leaving = next(i for i in instances if i.name == carrier)
            leaving.process.send_signal(signal.SIGTERM)
            await eventually(lambda: _down_at(stats_port, leaving.name), 15, "HAProxy takes it out")
            later = [await place() for _ in range(3)]
            for call_, caller_ in later:
                await talk(caller_)
                assert await owner(call_.call_sid) != leaving.name
            await talk(draining_caller)  # the draining instance still carries its call
            await draining_caller.hang_up()
            assert await asyncio.to_thread(leaving.process.wait, 40) == 0

            # 5. One instance SIGKILLed mid-call: a survivor marks the call interrupted.
            killed_call, _ = later[0]
            carrier = await owner(killed_call.call_sid)
            victim = next(i for i in instances if i.name == carrier)
            victim.process.kill()
            record = await record_of(database_settings, killed_call.call_sid, "interrupted")
            assert record["instance_id"] == victim.name
            for _, caller_ in later:
                await caller_.close()
        finally:
            balancer.terminate()
            for instance in instances:
                if instance.process.poll() is None:
                    instance.process.send_signal(signal.SIGTERM)
            for instance in instances:
                try:
                    instance.process.wait(30)
                except subprocess.TimeoutExpired:
                    instance.process.kill()
            balancer.wait(10)


def _settings(database: str):  # type: ignore[no-untyped-def]
    from ivr_bridge.settings import Settings, parse_database_url

    return Settings(database_url=parse_database_url(database), instance_id="reader")


async def _servers(stats_port: int) -> dict[str, str]:
    """HAProxy's view of the backend's servers: name -> status (UP, DOWN, ...)."""
    import csv

    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{stats_port}/stats;csv")).text
    rows = csv.DictReader(text.lstrip("# ").splitlines())
    return {row["svname"]: row["status"] for row in rows if row["pxname"] == "bridges"}


async def _down_at(stats_port: int, server: str) -> bool:
    """Whether HAProxy has marked `server` down (its /readyz answered 503)."""
    return (await _servers(stats_port)).get(server, "").startswith("DOWN")


async def _all_up(stats_port: int, count: int) -> bool:
    servers = await _servers(stats_port)
    return (
        sum(status == "UP" for name, status in servers.items() if name not in ("BACKEND", "FRONTEND"))
        == count
    )
