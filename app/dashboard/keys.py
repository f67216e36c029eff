"""Typed keys for what the dashboard app and its requests carry."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
import asyncpg
import jinja2
from aiohttp import web

from app.dashboard.control import Control
from app.dashboard.metrics import DashboardMetrics
from app.dashboard.sampler import Sampler
from app.settings import Settings
from app.store.passwords import Passwords
from app.store.throttle import Throttle


@dataclass(frozen=True, slots=True)
class Identity:
    """The admin signed in on a request (see auth.py)."""

    admin_id: int
    username: str
    csrf_token: str
    token_hash: bytes


SETTINGS = web.AppKey("settings", Settings)
TEMPLATES = web.AppKey("templates", jinja2.Environment)
POOL = web.AppKey("pool", asyncpg.Pool)
HTTP = web.AppKey("http", aiohttp.ClientSession)
CONTROL = web.AppKey("control", Control)
SAMPLER = web.AppKey("sampler", Sampler)
METRICS = web.AppKey("metrics", DashboardMetrics)
PASSWORDS = web.AppKey("passwords", Passwords)
THROTTLE = web.AppKey("throttle", Throttle)
# Set when the app shuts down: live streams end instead of holding the shutdown up.
STOPPING = web.AppKey("stopping", asyncio.Event)

IDENTITY = web.RequestKey("identity", Identity)
