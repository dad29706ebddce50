"""provscope.agent: the node agent daemon: collectors, the sampling scheduler, the local
ingest server for the jobs on the node, and the daemon that runs them with one pipeline."""
