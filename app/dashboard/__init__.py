"""The admin web dashboard: who is logged in where, workers and the DB cluster live.

server.py      the aiohttp app (routes, resources) and the process (`switchboard dashboard`)
auth.py        admin login, session cookie, CSRF, idle timeout, login rate limits
views.py       pages (Jinja2, rendered on the server) and actions (drain, kick, ...)
sampler.py     the live view: one immutable Snapshot of the cluster per tick
control.py     HTTP calls to workers (health, drain) and Patroni (history, switchover)
store.py       the dashboard's queries: admins, aggregates, paginated lists, kick
metrics.py     Prometheus metrics of the dashboard process
cli.py         `switchboard dashboard` and `switchboard admin create`
templates/     the pages; static/ the stylesheet and the chart/live script (no CDN)
"""
