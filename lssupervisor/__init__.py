"""lssupervisor: supervise PowerDNS Lightning Stream and migrate the LMDB schema it syncs."""

__version__ = "0.1.0"
