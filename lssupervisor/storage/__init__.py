"""The shared storage, as lssupervisor sees it: where each schema version's snapshots live, what is
there, and retiring what no instance needs any more.

Theory of operation
-------------------
Every instance syncs its LMDB through one storage (an s3 bucket, or an fs directory tree) under a
location that carries the schema version (``global_prefix: app/v${APP_SCHEMA_VERSION}/`` or
``root_path: /data/ls/v${APP_SCHEMA_VERSION}``). :mod:`.location` renders the LS template with a
sentinel version to learn the location as ``head + N + tail`` and opens the backend with LS's own
options (credentials from the environment LS gets, never written anywhere). A backend
(:mod:`.fs`, :mod:`.s3`) lists every version location that exists, probes access, and deletes in
batches. :mod:`.names` parses LS snapshot names; :mod:`.fleet` turns a listing into the fleet report
(which instance syncs which version, stragglers, stale instances) and :mod:`.prune` plans and runs the
retirement of old version locations, refusing while any instance still needs them.

Used by ``check`` (the probe), ``fleet --storage``, ``prune`` and the daemon's fleet view. Imports no
``lmdb`` (the daemon loads it) and nothing of ``lssupervisor.testing``.

    lsconfig (template, env) -> location.Layout -> backend (fs | s3) -> listing
                                                                     -> fleet.report  (fleet, /fleet, metrics)
                                                                     -> prune.plan -> prune.run
"""
