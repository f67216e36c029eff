"""Switchboard: an instant-messaging server cluster.

Tiers, one package each: ``protocol`` (sans-I/O codec), ``worker`` (socket
workers), ``store`` (PostgreSQL), ``cluster`` (the local tier launcher),
``client`` (SDK), ``cli`` (the ``switchboard`` command).
"""

__version__ = "0.1.0"
