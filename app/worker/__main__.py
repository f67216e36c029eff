"""``python -m app.worker``: one socket worker, configured by SWITCHBOARD_* variables."""

from app.worker.main import main

main()
