"""Environment variables that provscope reads, as documented constants.

Every leaf setting ``a.b.c`` also has ``PROVSCOPE_A_B_C`` (``provscope.config.env_names``);
the names below are the ones that are not settings.
"""

PREFIX = "PROVSCOPE_"

#: Path of the YAML config file.
CONFIG = "PROVSCOPE_CONFIG"
#: Run id a job joins (set by ``provscope run`` for the command it starts).
RUN_ID = "PROVSCOPE_RUN_ID"
#: Task id of the ``provscope run`` command task, the parent of the job's tasks.
PARENT_TASK_ID = "PROVSCOPE_PARENT_TASK_ID"
#: Rank override; otherwise RANK, the launchers' rank variables, torch.distributed
#: (``provscope.job.identity``).
RANK = "PROVSCOPE_RANK"
#: "0" disables all in-job instrumentation (the API becomes a no-op).
ENABLED = "PROVSCOPE_ENABLED"
