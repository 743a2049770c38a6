"""The per-host process (``manage.py berth_agent``): the inventory collector loop beside an RQ
worker on the host's own queue."""
