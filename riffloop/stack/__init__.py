"""Local infrastructure plus the six service processes (``python -m riffloop.stack``)."""

from riffloop.stack._stack import SERVICES, TINY, ServiceProcess, ServiceProcesses, free_port

__all__ = ["SERVICES", "TINY", "ServiceProcess", "ServiceProcesses", "free_port"]
