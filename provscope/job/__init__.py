"""The in-job API and what carries its records out of the job: runs and tasks
(``run``), the module-level functions (``api``), run/task context (``context``),
environment and code capture (``capture``), where records go (``sink``) and the
connection to the node agent (``agent_client``)."""
