"""Many hosts on one machine: a Linux network namespace per host, on one bridge.

``hosts_net`` (app/settings.py) names the hosts and their addresses. ``create``
makes, with iproute2's ``ip``: a bridge on the machine (with the network's first
address, so the operator's tools and the supervisor reach every host), and for each
host a namespace ``<prefix>-<host>`` joined to the bridge by a veth pair whose inside
end is ``eth0``. ``destroy`` removes every one of them, whatever is left. Partitions
are nftables rules inside a host's namespace (``cut``/``heal``); a host that dies
has its link taken down (``set_link``), which also silences its copy of the
virtual IP.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable

from app.cluster.errors import ComponentFailed
from app.settings import Settings

# The nftables table partitions live in (one per host namespace).
PARTITION_TABLE = "switchboard_partition"
INSIDE_LINK = "eth0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise ComponentFailed(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def bridge_name(settings: Settings) -> str:
    return f"{settings.hosts_prefix}-br"


def netns(settings: Settings, host: str) -> str:
    return settings.host_netns(host)


def existing(settings: Settings) -> list[str]:
    """This layout's namespaces that exist now."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    present = {line.split()[0] for line in listed if line.strip()}
    return [netns(settings, h) for h in settings.hosts() if netns(settings, h) in present]


def preflight(settings: Settings) -> None:
    for tool, package in (("ip", "iproute2"), ("keepalived", "keepalived"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            raise ComponentFailed(f"{tool} not found: install the Debian package {package}")
    left = existing(settings)
    if left or _ip("link", "show", bridge_name(settings), check=False).returncode == 0:
        raise ComponentFailed(
            f"the hosts of a previous run are still there ({', '.join(left) or 'the bridge'}): "
            f"`switchboard down --hosts {settings.hosts_cidr()}` removes them"
        )


def create(settings: Settings) -> None:
    bridge = bridge_name(settings)
    prefix = settings.hosts_prefixlen()
    _ip("link", "add", bridge, "type", "bridge")
    _ip("addr", "add", f"{settings.bridge_address()}/{prefix}", "dev", bridge)
    _ip("link", "set", bridge, "up")
    for host, address in settings.hosts().items():
        ns = netns(settings, host)
        _ip("netns", "add", ns)
        _ip("link", "add", ns, "type", "veth", "peer", "name", INSIDE_LINK, "netns", ns)
        _ip("link", "set", ns, "master", bridge, "up")
        _ip("-n", ns, "addr", "add", f"{address}/{prefix}", "dev", INSIDE_LINK)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "set", INSIDE_LINK, "up")
        if host.startswith("lb"):
            # HAProxy binds the virtual IP on both balancers; only the active one has it.
            _sysctl(ns, "net.ipv4.ip_nonlocal_bind=1")


def _sysctl(ns: str, assignment: str) -> None:
    _ip("netns", "exec", ns, "sysctl", "-q", "-w", assignment)


def destroy(settings: Settings) -> None:
    """Remove every namespace, veth and the bridge this layout made (those left)."""
    for ns in existing(settings):
        _ip("netns", "delete", ns, check=False)  # its veth pair goes with it
    for host in settings.hosts():
        _ip("link", "delete", netns(settings, host), check=False)
    _ip("link", "delete", bridge_name(settings), check=False)


def set_link(settings: Settings, host: str, up: bool) -> None:
    """Take a host off the network (its link down) or put it back."""
    _ip("-n", netns(settings, host), "link", "set", INSIDE_LINK, "up" if up else "down")


def vip_holder(settings: Settings) -> str | None:
    """The balancer host whose link is up and holds the virtual IP (None: none does)."""
    for host in ("lb1", "lb2"):
        shown = _ip("-n", netns(settings, host), "-br", "addr", "show", INSIDE_LINK, check=False)
        fields = shown.stdout.split()
        if len(fields) > 1 and fields[1] != "DOWN" and f"{settings.vip()}/" in shown.stdout:
            return host
    return None


def cut(settings: Settings, host: str, peers: Iterable[str]) -> None:
    """Partition ``host`` from the ``peers`` addresses: every packet between them is
    dropped inside ``host``'s namespace, both ways (nftables)."""
    addresses = ", ".join(sorted(set(peers)))
    hook = "type filter hook {} priority 0; ip {} {{ " + addresses + " }} drop;"
    ruleset = (
        f"table inet {PARTITION_TABLE} {{\n"
        f"  chain input {{ {hook.format('input', 'saddr')} }}\n"
        f"  chain output {{ {hook.format('output', 'daddr')} }}\n"
        "}\n"
    )
    result = subprocess.run(
        ["ip", "netns", "exec", netns(settings, host), "nft", "-f", "-"],
        input=ruleset,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ComponentFailed(f"nft in {host}: {result.stderr.strip()}")


def heal(settings: Settings, host: str) -> None:
    """Remove ``host``'s partition rules (nothing to do when there are none)."""
    subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            netns(settings, host),
            "nft",
            "delete",
            "table",
            "inet",
            PARTITION_TABLE,
        ],
        capture_output=True,
        check=False,
    )
