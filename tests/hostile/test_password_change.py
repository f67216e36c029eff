"""A password change against a real cluster: it ends the user's other sessions and
their resume tokens, and nobody else notices (docs/security.md)."""

from __future__ import annotations

import pytest

from app.cluster.launcher import LocalCluster
from app.worker.revoke import KICKED_MESSAGES
from tests.hostile.bystander import hello, timed
from tests.integration.helpers import PASSWORD, login, new_user
from tests.linechat import LineClient

pytestmark = pytest.mark.integration


async def test_a_password_change_ends_the_other_sessions_and_tokens(
    cluster: LocalCluster,
) -> None:
    """M3: devices A and B logged in, C detached; A changes the password. B is kicked,
    B's and C's resume tokens are dead, A stays; another user sees nothing."""
    user, friend = new_user("pw"), new_user("friend")
    a, _ = await login(cluster, user, device="A", worker="w1")
    b, welcome_b = await login(cluster, user, device="B", worker="w2", register_first=False)
    c, welcome_c = await login(cluster, user, device="C", worker="w3", register_first=False)
    await c.close()
    f, _ = await login(cluster, friend, worker="w2")
    new = PASSWORD + " (changed)"
    changed = await timed(a, {"op": "password", "old": PASSWORD, "new": new})
    assert changed["op"] == "ok", changed
    kicked = await b.recv_until("error")
    assert (kicked["code"], kicked["message"]) == ("kicked", KICKED_MESSAGES["password_changed"])
    assert await b.closed()
    await b.close()
    for device, welcome in (("B", welcome_b), ("C", welcome_c)):
        probe = await LineClient.connect(cluster.settings.host, cluster.settings.client_port)
        reply = await probe.request(
            {
                "op": "resume",
                "user": user,
                "device": device,
                "token": welcome["resume_token"],
                "last_seq": 0,
            }
        )
        assert reply["code"] == "bad_token", (device, reply)
        await probe.close()
    # A is still logged in, and so is the bystander on B's worker.
    sent = await timed(a, {"op": "send", "to": friend, "cmid": "after", "body": "still me"})
    assert sent["op"] == "sent", sent
    assert (await f.recv())["body"] == "still me"
    assert (await timed(f, {"op": "ping"}))["op"] == "pong"
    for each in (a, f):
        await each.close()
    # The old password is gone, the new one works.
    probe = await LineClient.connect(cluster.settings.host, cluster.settings.client_port)
    assert (await probe.request(hello(user, PASSWORD, "D")))["code"] == "auth_failed"
    assert (await probe.request(hello(user, new, "D")))["op"] == "welcome"
    await probe.close()
